"""The run directory: config, evaluation log, atomic checkpoints and results.

Layout::

    run_dir/
      config.json         the configuration that produced the run (checked on --resume)
      evaluations.jsonl   one line per evaluation, flushed as it finishes
      checkpoint.json     strategy state after the last finished generation (atomic)
      results.json        per-generation best, every evaluation, timings, baselines; written
                          last (atomic), so its presence marks a finished run
      best_genome.json    the best genome and its description
      study.db            the same record as an Optuna study (see evosearch.record)
      model/              the best compressed model (written to a temporary folder, renamed)
      report.html         the run's report (evosearch.report), with convergence.png,
                          layers.png, pareto.png, pareto.csv and pareto.json

With an :class:`~evosearch.record.OptunaRecord` attached, every evaluation and checkpoint is also
written to the study, and a run whose files are gone (another machine, a shared RDB) resumes
from the study alone.

The life of a run: :meth:`RunDir.check` (before anything loads: does ``--out`` hold another
run?), :meth:`RunDir.start` (after the model and data loaded: claim the directory),
:meth:`RunDir.prepare_search` (reconcile the study with the log, start the clock), the search,
then :meth:`RunDir.totals` for ``results.json``. :func:`check_finished` guards the commands that
read a finished run (``eval``, ``export``, ``report``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evosearch.errors import (
    UserError,
    atomic_write_text,
    kill_point,
    read_json,
    remove_stale_temporaries,
)

__all__ = [
    "RUN_FILES",
    "RunConfigMismatch",
    "RunDir",
    "check_finished",
    "is_run_dir",
    "known_genomes",
    "normalise_paths",
    "write_json_atomic",
]

# Everything a run writes (removed by --overwrite; nothing else in the folder is touched).
RUN_FILES = (
    "config.json", "evaluations.jsonl", "checkpoint.json", "results.json", "best_genome.json",
    "study.db", "model", "report.html", "convergence.png", "layers.png", "pareto.png",
    "pareto.csv", "pareto.json", "pareto_front.json", "pareto_front.csv",
)  # fmt: skip
# Config values that may name files: compared by resolved path on --resume.
# Keys (at any depth of a nested config) whose values may name files.
PATH_KEYS = ("model", "data", "source", "eval_ppl", "ppl", "db_dir", "pruner", "storage")


class RunConfigMismatch(UserError):
    """``--resume`` of a run directory created with a different configuration."""


def _truncate_partial_line(path: Path) -> None:
    """Cut a file back to its last newline (drops a line a kill left half-written)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a crash) never sees a half-written file."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _normalise(value: Any) -> Any:
    """An existing file named relatively or absolutely compares equal (resolved path)."""
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, str) and value and os.path.exists(os.path.expanduser(value)):
        return os.path.realpath(os.path.expanduser(value))
    return value


def normalise_paths(config: dict) -> dict:
    """``config`` with the values of :data:`PATH_KEYS` that name existing files resolved (in
    nested sections too)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out[k] = normalise_paths(v)
        else:
            out[k] = _normalise(v) if k in PATH_KEYS else v
    return out


class RunDir:
    """One search's directory."""

    def __init__(self, path: str | os.PathLike, *, record=None) -> None:
        self.path = Path(path)
        self.record = record  # an OptunaRecord mirror, or None
        self._log_checked = False
        self._t0 = time.perf_counter()
        self._prior_seconds = 0.0  # search seconds of earlier processes (from the checkpoint)

    def file(self, name: str) -> Path:
        """The path of ``name`` in the run directory."""
        return self.path / name

    def _old_config(self) -> dict | None:
        cfg_file = self.file("config.json")
        if cfg_file.exists():
            old = read_json(cfg_file, "cannot read the run's config")
            if not isinstance(old, dict):
                raise UserError("cannot read the run's config", cfg_file, "not a JSON object")
            return old
        return self.record.config() if self.record is not None else None

    def check(
        self,
        config: dict,
        *,
        resume: bool,
        overwrite: bool = False,
        ignore: tuple[str, ...] = (),
        legacy: dict | None = None,
        upgrade: Callable[[dict], dict] | None = None,
    ) -> bool:
        """Whether ``config`` may run in this directory; writes nothing (``upgrade`` turns a
        config written by an earlier version into today's form before the comparison). Raises a
        :class:`UserError` for another run without ``resume``/``overwrite`` and a
        :class:`RunConfigMismatch` when ``resume`` meets a different config. Returns True when
        a previous run of the same config should be continued."""
        old = self._old_config()
        if old is None or overwrite:
            return False
        if not resume:
            raise UserError(
                "the run directory already holds a run",
                self.path,
                "pass --resume to continue it, --overwrite to start over, or another --out",
            )
        old = {**(legacy or {}), **old}
        if upgrade is not None:
            old = upgrade(old)
        old, new = normalise_paths(old), normalise_paths(config)
        keys = (set(old) | set(new)) - set(ignore)
        if diff := sorted(k for k in keys if old.get(k) != new.get(k)):
            detail = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diff[:3])
            raise RunConfigMismatch(
                "cannot resume",
                self.path,
                f"its config differs in {detail}{', ...' if len(diff) > 3 else ''}; pass "
                "--overwrite to start over",
            )
        return True

    def start(
        self,
        config: dict,
        *,
        resume: bool,
        overwrite: bool = False,
        ignore: tuple[str, ...] = (),
        legacy: dict | None = None,
        upgrade: Callable[[dict], dict] | None = None,
    ) -> bool:
        """Claim the directory (call it once the model and data have loaded, so a failure
        before leaves nothing) or, with ``resume``, check it holds the same config.

        Keys in ``ignore`` (settings that cannot change results, such as where evaluations
        run) may differ on resume; ``config.json`` keeps the first run's values. ``legacy``
        gives the value of settings added after a run was written, as that run used them
        (its ``config.json`` lacks the key) and ``upgrade`` an earlier version's config in
        today's form. ``overwrite`` deletes a previous run first.

        Returns True when a previous run's state should be loaded.
        """
        if overwrite:
            self.clear()
        resuming = self.check(config, resume=resume, ignore=ignore, legacy=legacy, upgrade=upgrade)
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)  # what a killed write left behind
        if resuming:
            if not self.file("config.json").exists():
                write_json_atomic(self.file("config.json"), self._old_config())
            return True
        write_json_atomic(self.file("config.json"), config)
        if self.record is not None:
            self.record.set_config(config)
        return False

    def clear(self) -> None:
        """Delete the run's own files (:data:`RUN_FILES`) and its study; nothing else."""
        for name in RUN_FILES:
            if name == "study.db" and self.record is not None:
                continue  # open in this process; record.clear() empties it
            item = self.file(name)
            if item.is_dir():
                shutil.rmtree(item)
            elif item.exists():
                item.unlink()
        remove_stale_temporaries(self.path)
        if self.record is not None:
            self.record.clear()

    def append_evaluation(self, record: dict) -> None:
        """Log one finished evaluation (flushed), then mirror it to the study."""
        path = self.file("evaluations.jsonl")
        if not self._log_checked:
            _truncate_partial_line(path)  # a kill mid-write leaves half a line behind
            self._log_checked = True
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        kill_point("evaluation")  # logged, not yet in the study: reconciled on resume
        if self.record is not None:
            self.record.add(record)

    def evaluations(self) -> list[dict]:
        """Logged evaluations; a last line cut short by a kill is ignored."""
        path = self.file("evaluations.jsonl")
        if not path.exists():
            return self.record.evaluations() if self.record is not None else []
        out = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError("cannot read the evaluation log", path, "not UTF-8 text") from None
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and {"genome", "batch"} <= set(rec):
                out.append(rec)
        return out

    def write_checkpoint(self, state: dict) -> None:
        """Replace the checkpoint atomically (with the run's search seconds so far), then its
        copy in the study."""
        state = {**state, "search_seconds": round(self.search_seconds(), 3)}
        write_json_atomic(self.file("checkpoint.json"), state)
        kill_point("checkpoint")
        if self.record is not None:
            self.record.set_checkpoint(state)

    def checkpoint(self) -> dict | None:
        """The last checkpoint (file, else study), checked for its schema."""
        path = self.file("checkpoint.json")
        if path.exists():
            state = read_json(path, "cannot read the checkpoint")
        elif self.record is not None:
            state, path = self.record.checkpoint(), "the study's checkpoint"
        else:
            return None
        if state is None:
            return None
        if not isinstance(state, dict) or not isinstance(state.get("strategy"), dict):
            raise UserError(
                "cannot read the checkpoint",
                path,
                'expected {"strategy": {...}}; delete it to resume from the evaluation log, or '
                "rerun with --overwrite",
            )
        self._prior_seconds = float(state.get("search_seconds", 0.0))
        return state

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``name`` in the run directory atomically."""
        write_json_atomic(self.file(name), obj)

    def prepare_search(self) -> None:
        """Call right before the search: bring the study and the log into agreement (a kill
        between the two writes leaves one behind) and start this process's clock."""
        if self.record is not None:
            self._reconcile()
        self._t0 = time.perf_counter()

    def _reconcile(self) -> None:
        path = self.file("evaluations.jsonl")
        logged = self.evaluations()
        if not path.exists():
            return  # the study is the only record
        stored = self.record.evaluations()
        if len(stored) < len(logged):  # the study missed the evaluation in flight at the kill
            for rec in logged[len(stored) :]:
                self.record.add(rec)
        elif len(stored) > len(logged):  # the log's last line was cut short
            _truncate_partial_line(path)
            with path.open("a") as fh:
                for rec in stored[len(logged) :]:
                    fh.write(json.dumps(rec) + "\n")
        self._log_checked = True
        ckpt = self.file("checkpoint.json")
        if ckpt.exists():
            state = read_json(ckpt, "cannot read the checkpoint")
            if state != self.record.checkpoint():
                self.record.set_checkpoint(state)

    def search_seconds(self) -> float:
        """Search seconds over every process of the run, up to now."""
        return self._prior_seconds + (time.perf_counter() - self._t0)

    def totals(self, evaluations: list[dict]) -> dict[str, Any]:
        """Evaluations, tokens and seconds of the whole run, across resumes."""
        seconds = self.search_seconds()
        n = len(evaluations)
        return {
            "n_evaluations": n,
            "failed_evaluations": sum(1 for e in evaluations if e.get("error")),
            "search_seconds": round(seconds, 2),
            "evaluations_per_second": round(n / max(seconds, 1e-9), 3),
            "tokens": sum(int(e.get("tokens", 0)) for e in evaluations),
        }


def _resume_hint(run_dir: Path) -> str:
    config = run_dir / "config.json"
    return f"finish it with `evosearch search --config {config} --out {run_dir} --resume`"


def check_finished(run_dir: str | os.PathLike, *, model: bool = True) -> dict:
    """The config of a finished run; a :class:`UserError` saying what is missing (and how to
    finish the run) otherwise. ``model``: the run's ``model/`` must be complete too."""
    from evosearch.models import check_complete

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("not a run directory", run_dir, "no such directory")
    if not (run_dir / "config.json").is_file():
        raise UserError(
            "not a run directory", run_dir, "no config.json (nor results.json, once finished)"
        )
    config = read_json(run_dir / "config.json", "not a run directory")
    if not (run_dir / "results.json").is_file():
        raise UserError(
            "incomplete run", run_dir, f"results.json is missing; {_resume_hint(run_dir)}"
        )
    read_json(run_dir / "results.json", "cannot read the run's results")
    if model and config.get("save_model", True):
        if not (run_dir / "model").is_dir():
            raise UserError(
                "incomplete run", run_dir, f"model/ is missing; {_resume_hint(run_dir)}"
            )
        if problem := check_complete(run_dir / "model"):
            raise UserError(
                "incomplete model", run_dir / "model", f"{problem}; {_resume_hint(run_dir)}"
            )
    return config


def known_genomes(run_dir: str | os.PathLike) -> set[str]:
    """Keys of every genome a finished run evaluated or reported (its best, the baselines,
    the Pareto front): what ``evosearch export`` may materialise."""
    results = read_json(Path(run_dir) / "results.json", "cannot read the run's results")
    keys = {e["genome"] for e in results.get("evaluations", []) if "genome" in e}
    keys.add(results.get("best", {}).get("genome"))
    keys.update(b.get("genome") for b in results.get("baselines", {}).values())
    return {k for k in keys if k}


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or was meant to be) a search's run directory, as opposed to a model
    folder: it holds a run's own files beside ``config.json``."""
    path = Path(path)
    markers = ("evaluations.jsonl", "checkpoint.json", "results.json", "study.db", "model")
    return (path / "config.json").is_file() and any((path / m).exists() for m in markers)
