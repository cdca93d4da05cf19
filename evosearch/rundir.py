"""The run directory: config, evaluation log, atomic checkpoints and results.

Layout::

    run_dir/
      config.json         the configuration that produced the run (checked on --resume)
      evaluations.jsonl   one line per evaluation, flushed as it finishes
      checkpoint.json     strategy state after the last finished generation (atomic)
      results.json        per-generation best, every evaluation, timings, baselines
      best_genome.json    the best genome and its description
      study.db            the same record as an Optuna study (see evosearch.record)
      model/              the best compressed model
      report.html         the run's report (evosearch.report), with convergence.png,
                          layers.png, pareto.png, pareto.csv and pareto.json

With an :class:`~evosearch.record.OptunaRecord` attached, every evaluation and checkpoint is also
written to the study, and a run whose files are gone (another machine, a shared RDB) resumes
from the study alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RunDir", "RunConfigMismatch", "write_json_atomic"]


class RunConfigMismatch(ValueError):
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDir:
    """One search's directory."""

    def __init__(self, path: str | os.PathLike, *, record=None) -> None:
        self.path = Path(path)
        self.record = record  # an OptunaRecord mirror, or None
        self._log_checked = False

    def file(self, name: str) -> Path:
        return self.path / name

    def start(
        self,
        config: dict,
        *,
        resume: bool,
        ignore: tuple[str, ...] = (),
        legacy: dict | None = None,
        upgrade: Callable[[dict], dict] | None = None,
    ) -> bool:
        """Create the directory or, with ``resume``, check it holds the same config.

        Keys in ``ignore`` (settings that cannot change results, such as where evaluations
        run) may differ on resume; ``config.json`` keeps the first run's values. ``legacy``
        gives the value of settings added after a run was written, as that run used them
        (its ``config.json`` lacks the key); ``upgrade`` turns a config written by an earlier
        version into today's form before the comparison.

        Returns True when a previous run's state should be loaded.
        """
        cfg_file = self.file("config.json")
        old = json.loads(cfg_file.read_text()) if cfg_file.exists() else None
        if old is None and self.record is not None:
            old = self.record.config()  # the files are elsewhere; the study has the run
        if old is not None:
            if not resume:
                raise FileExistsError(
                    f"{self.path} already holds a run; pass --resume to continue it or choose "
                    "another --out"
                )
            old = {**(legacy or {}), **old}
            if upgrade is not None:
                old = upgrade(old)
            keys = (set(old) | set(config)) - set(ignore)
            if diff := sorted(k for k in keys if old.get(k) != config.get(k)):
                raise RunConfigMismatch(
                    f"cannot resume {self.path}: its config differs in {', '.join(diff)}"
                )
            if not cfg_file.exists():
                self.path.mkdir(parents=True, exist_ok=True)
                write_json_atomic(cfg_file, config)
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_file, config)
        if self.record is not None:
            self.record.set_config(config)
        return False

    def append_evaluation(self, record: dict) -> None:
        path = self.file("evaluations.jsonl")
        if not self._log_checked:
            _truncate_partial_line(path)  # a kill mid-write leaves half a line behind
            self._log_checked = True
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self.record is not None:
            self.record.add(record)

    def evaluations(self) -> list[dict]:
        """Logged evaluations; a last line cut short by a kill is ignored."""
        path = self.file("evaluations.jsonl")
        if not path.exists():
            return self.record.evaluations() if self.record is not None else []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write_checkpoint(self, state: dict) -> None:
        write_json_atomic(self.file("checkpoint.json"), state)
        if self.record is not None:
            self.record.set_checkpoint(state)

    def checkpoint(self) -> dict | None:
        path = self.file("checkpoint.json")
        if path.exists():
            return json.loads(path.read_text())
        return self.record.checkpoint() if self.record is not None else None

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.file(name), obj)
