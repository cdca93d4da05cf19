"""Run reports: convergence curves, Pareto flags, per-unit levels, the files written, the CLI,
and the report at the end of a search (whose failure must not lose the results)."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import subprocess
import sys

import pytest

from evosearch import report
from evosearch.cli import main


def _results(strategy: str = "evopress") -> dict:
    """A hand-written results.json of a 6-block search over two generations."""
    evals = [
        {
            "genome": "110000",
            "tokens": 16,
            "value": 0.5,
            "seconds": 0.1,
            "generation": 0,
            "stage": 0,
        },
        {
            "genome": "000011",
            "tokens": 16,
            "value": 0.4,
            "seconds": 0.1,
            "generation": 0,
            "stage": 0,
        },
        {
            "genome": "000011",
            "tokens": 64,
            "value": 0.3,
            "seconds": 0.3,
            "generation": 0,
            "stage": 1,
        },
        {
            "genome": "000101",
            "tokens": 16,
            "value": 0.2,
            "seconds": 0.1,
            "generation": 1,
            "stage": 0,
        },
        {
            "genome": "000101",
            "tokens": 64,
            "value": 0.25,
            "seconds": 0.3,
            "generation": 1,
            "stage": 1,
        },
        {
            "genome": "001100",
            "tokens": 16,
            "value": 0.9,
            "seconds": 0.2,
            "generation": 2,
            "stage": 0,
        },
    ]
    return {
        "config": {"model": "tiny-model", "fitness": "kl", "strategy": strategy},
        "space": {"space": "layer-drop", "n_blocks": 6, "num_drop": 2, "sublayers": False},
        "best": {"genome": "000101", "dropped_blocks": [3, 5], "kl": 0.25},
        "history": [
            {"generation": 0, "best": "000011", "value": 0.3, "tokens": 64},
            {"generation": 1, "best": "000101", "value": 0.25, "tokens": 64},
            {"generation": 2, "best": "000101", "value": 0.25, "tokens": 64},
        ],
        "n_evaluations": len(evals),
        "tokens": sum(e["tokens"] for e in evals),
        "search_seconds": 1.1,
        "evaluations": evals,
        # an old-style entry without "genome": the report rebuilds it from dropped_blocks
        "baselines": {
            strategy: {"dropped_blocks": [3, 5]},
            "last": {"dropped_blocks": [4, 5]},
            "shortgpt": {"genome": "110000", "dropped_blocks": [0, 1]},
        },
        "calibration_fitness": {strategy: 0.26, "last": 0.31, "shortgpt": 0.9},
        "perplexity": {
            "dense": {"wiki": 10.0},
            strategy: {"wiki": 14.0},
            "last": {"wiki": 13.0},
            "shortgpt": {"wiki": 30.0},
        },
    }


def _write_run(path, results):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_convergence_curve_cumulates_cost_per_generation():
    curve = report.convergence_curve(_results())
    assert curve["generation"] == [0, 1, 2]
    assert curve["value"] == [0.3, 0.25, 0.25]
    assert curve["evaluations"] == [3, 5, 6]
    assert curve["tokens"] == [96, 176, 192]
    assert curve["seconds"] == pytest.approx([0.5, 0.9, 1.1])


def test_convergence_curve_carries_the_pooled_estimate_beside_the_batch_value(tmp_path):
    results = _results()
    assert all(math.isnan(v) for v in report.convergence_curve(results)["elite_value"])
    for h, (v, se) in zip(results["history"], [(0.31, None), (0.27, 0.02), (0.26, 0.01)]):
        h.update(elite_value=v, elite_se=se, elite_tokens=64, flip_rate=0.1)
    curve = report.convergence_curve(results)
    assert curve["value"] == [0.3, 0.25, 0.25]  # each generation's own batch, unchanged
    assert curve["elite_value"] == [0.31, 0.27, 0.26]
    assert math.isnan(curve["elite_se"][0]) and curve["elite_se"][1:] == [0.02, 0.01]
    assert report._band(curve) == (
        [0.31, pytest.approx(0.25), pytest.approx(0.25)],
        [0.31, pytest.approx(0.29), pytest.approx(0.27)],
    )
    run = report.RunRecord("r", tmp_path, results)
    report._plot_convergence([run], tmp_path / "convergence.png")
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_unit_levels_blocks_sublayers_and_generic():
    blocks = {"space": "layer-drop", "n_blocks": 4, "sublayers": False}
    subl = {"space": "layer-drop", "n_blocks": 3, "sublayers": True}
    assert report.unit_levels("0101", blocks) == {"dropped": [0, 1, 0, 1]}
    assert report.unit_levels("100011", subl) == {"attention": [1, 0, 0], "mlp": [0, 1, 1]}
    assert report.unit_levels("0a3", {"space": "width", "n_blocks": 3}) == {"level": [0, 10, 3]}


def test_pareto_flags():
    P = report.CandidatePoint
    a = P("r", "a", "0011", 2, {"kl": 0.3}, "m")
    b = P("r", "b", "0101", 2, {"kl": 0.2}, "m")  # dominates a: same units, lower kl
    c = P("r", "c", "0111", 3, {"kl": 0.5}, "m")  # more units dropped: on the front
    d = P("r", "d", "1111", 3, {"ppl": 9.0}, "m")  # shares no metric: nobody dominates it
    e = P("r", "e", "0101", 2, {"kl": 0.2}, "m")  # ties with b: neither dominates
    assert report.pareto_flags([a, b, c, d, e]) == [False, True, True, True, True]


def test_write_report_single_run(tmp_path):
    run = _write_run(tmp_path / "run", _results())
    page = report.write_report([run])
    assert page == run / "report.html"
    for name in ("convergence.png", "layers.png", "pareto.png", "pareto.csv", "pareto.json"):
        assert (run / name).stat().st_size > 0, name
    text = page.read_text()
    # every figure inlined as a PNG that decodes to the file written beside the page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3
    assert base64.b64decode(images[0]) == (run / "convergence.png").read_bytes()
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(https?:)?//', text)
    # comparison table: dense, the result and each baseline with their metrics
    assert "<td>dense</td>" in text and "<td>shortgpt</td>" in text and "<td>0.31</td>" in text
    # hover: each candidate an SVG point whose <title> names genome and metrics
    titles = re.findall(r"<circle[^>]*><title>(.*?)</title>", text, re.S)
    assert any("genome 110000" in t and "calibration kl 0.9" in t for t in titles)
    rows = {r["candidate"]: r for r in json.loads((run / "pareto.json").read_text())}
    assert set(rows) == {"evopress", "last", "shortgpt"}
    assert rows["last"]["genome"] == "000011"  # rebuilt from dropped_blocks
    assert rows["evopress"]["model"] == "tiny-model"
    assert rows["evopress"]["pareto"] and rows["last"]["pareto"]  # lower kl vs lower ppl
    assert not rows["shortgpt"]["pareto"]
    with (run / "pareto.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["candidate"] for r in table] == ["evopress", "last", "shortgpt"]
    assert table[0]["ppl wiki"] == "14.0"


def _quant_results() -> dict:
    """A GGUF quantization run over 2 blocks x (q_proj, down_proj) plus the embedding."""
    results = _results()

    def layers(q0, q1, d0, d1, emb):
        return {
            "model.layers.0.self_attn.q_proj": q0,
            "model.layers.1.self_attn.q_proj": q1,
            "model.layers.0.mlp.down_proj": d0,
            "model.layers.1.mlp.down_proj": d1,
            "embed_tokens": emb,
        }

    results["space"] = {"space": "quantization", "format": "gguf"}
    results["best"] = {
        "genome": "110004",
        "kl": 0.25,
        "bits_per_weight": 5.0,
        "quant_bytes": 1000,
        "layer_levels": layers("Q4_1", "Q4_1", "Q4_0", "Q5_0", "Q4_1"),
    }
    results["baselines"] = {
        "uniform": {
            "genome": "000040",
            "bits_per_weight": 5.3,
            "quant_bytes": 1060,
            "layer_levels": layers("Q4_0", "Q4_0", "Q4_0", "Q4_0", "Q8_0"),
        }
    }
    results["calibration_fitness"] = {"evopress": 0.26, "uniform": 0.3}
    results["export"] = {"file_bytes": 123456, "quant_bytes": 1000}
    return results


def test_report_shows_bits_per_layer_and_file_bytes_of_a_quantization_run(tmp_path):
    run = _write_run(tmp_path / "q", _quant_results())
    bits = report.layer_bits(report.load_run(run))
    assert bits["evopress"] == {
        "q_proj": [5.0, 5.0],
        "down_proj": [4.5, 5.5],
        "embed_tokens": [5.0],
    }
    assert bits["uniform"]["embed_tokens"] == [8.5] and report.level_bits(3) == 3.0
    text = report.write_report([run]).read_text()
    assert "<th>q_proj</th><th>down_proj</th><th>embed_tokens</th>" in text  # bits table
    assert "<td>123456</td>" in text  # the export's file bytes
    assert (run / "layers.png").stat().st_size > 0
    assert report.layer_bits(report.load_run(_write_run(tmp_path / "d", _results()))) is None


def test_write_report_compares_runs(tmp_path):
    a = _write_run(tmp_path / "a", _results())
    b = _write_run(tmp_path / "b", _results(strategy="random"))
    with pytest.raises(ValueError, match="--out"):
        report.write_report([a, b])
    page = report.write_report([a, b], tmp_path / "cmp")
    text = page.read_text()
    assert "2 runs compared" in text
    assert "<th>a</th><th>b</th>" in text  # side-by-side table
    rows = json.loads((tmp_path / "cmp" / "pareto.json").read_text())
    assert {(r["run"], r["candidate"]) for r in rows} >= {("a", "evopress"), ("b", "random")}


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "Traceback" not in err


def test_search_writes_report(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert (tiny_run / "report.html").is_file()
    rows = json.loads((tiny_run / "pareto.json").read_text())
    assert {r["candidate"] for r in rows} == {"evopress", "shortgpt", "angular", "last"}
    best = next(r for r in rows if r["candidate"] == "evopress")
    assert best["genome"] == results["best"]["genome"]
    assert best["calibration kl"] == pytest.approx(results["calibration_fitness"]["evopress"])
    assert any(k.startswith("ppl ") for k in best)


def test_report_cli_rebuilds(tiny_run, tmp_path, capsys):
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "again")]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (tmp_path / "again" / "layers.png").is_file()


def test_report_failure_keeps_search_results(tiny_run, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(report, "write_report", broken)
    config = json.loads((tiny_run / "config.json").read_text())
    from evosearch.pipeline import SearchConfig, run_search

    messages: list[str] = []
    out = tmp_path / "run"
    run_search(
        SearchConfig.from_dict({**config, "baselines": [], "eval_ppl": []}),
        out,
        log=messages.append,
    )
    assert (out / "results.json").is_file()
    assert not (out / "report.html").exists()
    assert any("warning: report not written" in m and "plotting exploded" in m for m in messages)


def test_import_evosearch_does_not_import_matplotlib():
    code = "import sys, evosearch, evosearch.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
