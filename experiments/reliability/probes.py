"""Run the probe table of ``tests/test_reliability.py`` against whichever evosearch is first on
``sys.path`` and print one JSON line per probe: exit code, last stderr line, whether a
traceback was printed and whether a failed search left a run directory behind.

    PYTHONPATH=. python experiments/reliability/probes.py > after.jsonl
    PYTHONPATH=/tmp/old:. python experiments/reliability/probes.py > before.jsonl  # old tree

Used to fill the before/after table of README.md (``table.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import torch  # noqa: E402
from test_reliability import PROBES, make_base, make_ctx  # noqa: E402

from evosearch.cli import main  # noqa: E402


def run_probe(make, base, tmp: Path) -> dict:
    """One probe: its command line built in ``tmp`` and run in-process."""
    ctx = make_ctx(base, tmp)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        argv = make(ctx)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - a traceback is what we record
            traceback.print_exc(file=err)
            code = f"traceback: {type(exc).__name__}"
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
    return {
        "code": code,
        "traceback": "Traceback" in err.getvalue(),
        "last": lines[-1][:300] if lines else "",
        "lines": len(lines),
        "left_out_dir": ctx.out.exists(),
    }


def main_probes() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            base = make_base(root)
        for i, (name, make, *_expected) in enumerate(PROBES):
            tmp = root / f"p{i}"
            tmp.mkdir()
            try:
                row = run_probe(make, base, tmp)
            except Exception as exc:  # noqa: BLE001 - the probe's own setup failed
                row = {"code": f"setup failed: {type(exc).__name__}: {exc}"[:200]}
            print(json.dumps({"probe": name, **row}), flush=True)


if __name__ == "__main__":
    main_probes()
