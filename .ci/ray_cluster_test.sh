#!/usr/bin/env bash
# A real two-node Ray cluster on this machine: a head node and a second node process, one CPU
# each, a tiny `evosearch search --runner ray` against it by address, a check of the result,
# and teardown. Each node runs `ray start --block` in its own process group, which this script
# kills at exit (also on failure); `ray stop` is not used because it stops every Ray process
# of the user on the machine, not only this cluster's.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
WORK=$(mktemp -d /tmp/esray.XXXXXX)   # short: Ray's socket paths must stay under 108 bytes
PGIDS=()

cleanup() {
    local rc=$?
    for pgid in "${PGIDS[@]}"; do
        kill -TERM -- "-$pgid" 2>/dev/null || true
    done
    for pgid in "${PGIDS[@]}"; do  # give `ray start --block` time to stop its processes
        for _ in $(seq 50); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pgid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then tail -n 20 "$WORK"/*.log || true; fi
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then echo "ray cluster test: passed"; else echo "ray cluster test: FAILED"; fi
    exit "$rc"
}
trap cleanup EXIT INT TERM

PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
HEAD="127.0.0.1:$PORT"
COMMON=(--num-cpus 1 --num-gpus 0 --disable-usage-stats --block)
# Ray 2.5x clusters started by `ray start` require token authentication: a fresh token for this
# cluster only, in the environment of the nodes and the driver (nothing written to ~/.ray).
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$BIN/python" -c 'import secrets; print(secrets.token_hex(16))')
export RAY_AUTH_TOKEN

setsid "$BIN/ray" start --head --port "$PORT" --temp-dir "$WORK/ray" --include-dashboard=false \
    "${COMMON[@]}" >"$WORK/head.log" 2>&1 &
PGIDS+=($!)
disown  # its exit at teardown is expected, not a job to report
# The second node joins once the head answers; `ray start` retries the connection itself.
setsid "$BIN/ray" start --address "$HEAD" "${COMMON[@]}" >"$WORK/node.log" 2>&1 &
PGIDS+=($!)
disown

# A tiny Llama with a real tokenizer, saved where both nodes' workers can load it.
PYTHONPATH=tests "$BIN/python" - "$WORK" <<'PY'
import sys
from pathlib import Path
from conftest import build_model, hf_tokenizer
work = Path(sys.argv[1])
build_model("llama", n_layers=6).save_pretrained(work / "tiny")
hf_tokenizer().save_pretrained(work / "tiny")
(work / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
PY

# Wait (bounded) until both nodes are alive.
"$BIN/python" - "$HEAD" <<'PY'
import sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    if time.monotonic() > deadline:
        sys.exit(f"only {len([n for n in ray.nodes() if n['Alive']])} Ray node(s) came up")
    time.sleep(0.5)
print(f"cluster up: {len(ray.nodes())} nodes, {ray.cluster_resources().get('CPU')} CPUs")
PY

# One worker per node: each node has one CPU and each worker asks for one.
"$BIN/evosearch" search --model "$WORK/tiny" --drop 2 --data "$WORK/calib.txt" \
    --n-sequences 4 --seq-len 16 --generations 2 --offspring 4 --initial-population 4 \
    --stages 16:2,64:1 --runner ray --workers 2 --worker-cpus 1 --ray-address "$HEAD" \
    --out "$WORK/run" | tee "$WORK/search.log"

grep -q "ray: 2 workers on 2 node(s)" "$WORK/search.log"
"$BIN/python" - "$WORK/run/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
runner = r["config"]["runner"]  # the nested config: {"name": ..., "ray": {...}}
assert runner["name"] == "ray" and runner["ray"]["workers"] == 2, r["config"]
assert len(r["best"]["dropped_blocks"]) == 2, r["best"]
assert len(r["history"]) == 3 and r["n_evaluations"] > 0
assert all(e.get("error") is None for e in r["evaluations"])
print(f"best {r['best']}, {r['n_evaluations']} evaluations on the cluster")
PY
