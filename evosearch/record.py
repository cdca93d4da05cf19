"""The search record as an Optuna study: every evaluation is a trial.

Each evaluation (one genome on one stage's shared batch) becomes a finished trial whose
parameters are the genome's levels (``block.3 = 1``), whose value is the fitness at that
fidelity (also stored as the intermediate value at step = tokens), and whose user attributes
hold the fidelity (tokens, batch), cost (seconds) and compression metrics. The strategy's
checkpoint is a study attribute, so a run resumes from the study alone: SQLite in the run
directory by default, or any Optuna storage URL (an RDB such as PostgreSQL, or
``journal:/path/file.log``) shared by several processes or machines. ``optuna-dashboard`` opens it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from evosearch.errors import UserError
from evosearch.genome import Genome, LevelSpec
from evosearch.validate import check_storage_url

__all__ = ["OptunaRecord", "open_storage"]


def open_storage(url: str):
    """An Optuna storage from a URL: ``sqlite:///…``, ``postgresql://…``, or ``journal:PATH``.

    A URL no backend can open, or a database that cannot be read, is a
    :class:`~evosearch.errors.UserError` naming the storage."""
    import optuna

    check_storage_url(url)
    try:
        if url.startswith("journal:"):
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and drivers raise many types
        raise UserError(
            "cannot open the Optuna storage", url, f"{type(exc).__name__}: {exc}".splitlines()[0]
        ) from None


class OptunaRecord:
    """Mirror of a run's evaluations and checkpoints in an Optuna study.

    Args:
        storage: storage URL (see :func:`open_storage`).
        study_name: study name; created if missing, reused (``--resume``) if present.
        direction: the fitness direction (``minimize``/``maximize``).

    Call :meth:`bind` with the genome shape before the first :meth:`add`.
    """

    def __init__(self, storage: str, study_name: str, *, direction: str = "minimize") -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.metrics: Callable[[Genome], dict[str, float]] | None = None
        self.names: tuple[str, ...] = ()
        self._distributions: dict = {}
        self._storage, self._direction = open_storage(storage), direction
        self.study = self._open(study_name)

    def _open(self, study_name: str):
        import optuna

        return optuna.create_study(
            storage=self._storage,
            study_name=study_name,
            direction=self._direction,
            load_if_exists=True,
        )

    def clear(self) -> None:
        """Delete the study's trials and attributes (``--overwrite``): a new, empty study of the
        same name."""
        import optuna

        name = self.study.study_name
        optuna.delete_study(study_name=name, storage=self._storage)
        self.study = self._open(name)

    def bind(
        self, spec: LevelSpec, metrics: Callable[[Genome], dict[str, float]] | None = None
    ) -> None:
        """Set the genome shape (parameter names and ranges) and the compression metrics
        ``f(genome) -> {name: number}`` stored with each trial."""
        import optuna

        self.metrics = metrics
        self.names = spec.names or tuple(f"unit.{i}" for i in range(spec.n_units))
        self._distributions = {
            n: optuna.distributions.IntDistribution(0, max(m, 1))
            for n, m in zip(self.names, spec.max_levels)
        }

    def add(self, record: dict[str, Any]) -> None:
        """Store one evaluation record (as the engine logs it) as a finished trial."""
        import optuna

        if not self.names:
            raise RuntimeError("OptunaRecord.bind() must be called before add()")
        genome = Genome.from_key(record["genome"])
        attrs: dict[str, Any] = {"record": json.dumps(record)}
        attrs.update({k: record[k] for k in ("genome", "tokens", "seconds") if k in record})
        if self.metrics is not None:
            attrs.update(self.metrics(genome))
        value = record.get("value")
        ok = value is not None and math.isfinite(value)
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            value=value if ok else None,
            params=dict(zip(self.names, genome.levels)),
            distributions=self._distributions,
            user_attrs=attrs,
            intermediate_values={int(record["tokens"]): value} if ok else None,
        )
        self.study.add_trial(trial)

    def evaluations(self) -> list[dict[str, Any]]:
        """Every stored evaluation record, in the order it was added."""
        return [
            json.loads(t.user_attrs["record"])
            for t in self.study.get_trials(deepcopy=False)
            if "record" in t.user_attrs
        ]

    def set_checkpoint(self, state: dict) -> None:
        self.study.set_user_attr("checkpoint", json.dumps(state))

    def checkpoint(self) -> dict | None:
        raw = self.study.user_attrs.get("checkpoint")
        return None if raw is None else json.loads(raw)

    def set_config(self, config: dict) -> None:
        self.study.set_user_attr("config", json.dumps(config))

    def config(self) -> dict | None:
        raw = self.study.user_attrs.get("config")
        return None if raw is None else json.loads(raw)
