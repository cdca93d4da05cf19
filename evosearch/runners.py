"""Runners: *where* the genomes of one request are evaluated.

:func:`evosearch.engine.search` decides *what* to evaluate: it memoises, logs, checkpoints and
tells the strategy, always in request order. A runner only maps ``(genomes, batch)`` to one
:class:`Outcome` per genome, yielded in the order given (each as soon as it and all before it
are done, so the log is flushed as evaluations finish), so a result never depends on how many
workers there are or in which order their evaluations finish.

* :class:`InProcessRunner` (the default) evaluates one genome after another with the engine's
  own :class:`~evosearch.engine.Evaluator`.
* :class:`RayRunner` keeps a pool of Ray actors. Each builds its own evaluator *once* from a
  picklable ``factory`` (load the model, prepare the fitness) and then evaluates many candidates;
  large read-only objects (calibration tokens, the dense cache) go to the object store once and
  every actor reads them from there. A worker that dies is replaced and its candidates re-run,
  up to ``max_retries`` times per candidate. Ray is imported only when a RayRunner is built.

  When the fitness is additive (:func:`~evosearch.evaluation.is_additive`) and a request's
  candidates do not divide evenly among the workers (EvoPress's last racing stage: a few
  survivors on many tokens), the candidates' sequences are laid end to end and cut into one
  equal piece per worker (:func:`plan_shards`); each worker returns partial sums and the driver
  combines them (``evaluator.combine``). Pieces are whole micro batches of the fitness, so every
  micro batch is computed exactly as in process.

Strategies and fitnesses never see a runner.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from evosearch.evaluation import Batch
from evosearch.genome import Genome

__all__ = [
    "InProcessRunner",
    "Outcome",
    "RayRunner",
    "RayRunnerConfig",
    "Runner",
    "WorkerLostError",
    "plan_shards",
]


@dataclass(frozen=True)
class Outcome:
    """One evaluation's result as a worker reports it.

    Attributes:
        value: the fitness in its own direction (``nan`` when ``error`` is set).
        error: why the evaluation failed (``"RuntimeError: ..."``), or ``None``.
        seconds: wall time of the evaluation on the worker (summed over shards).
        total, count: an additive fitness's sums (:class:`~evosearch.evaluation.AdditiveFitness`)
            when this is the outcome of one shard of a batch; ``None`` otherwise.
        sequences: ``(total, count)`` of each sequence of the batch (or shard), in order, when
            the fitness gives them (``Candidate.sequences``); ``None`` otherwise.
    """

    value: float
    error: str | None
    seconds: float
    total: float | None = None
    count: float | None = None
    sequences: tuple[tuple[float, float], ...] | None = None

    @classmethod
    def failed(cls, error: str, seconds: float = 0.0) -> Outcome:
        return cls(math.nan, error, seconds)


class Runner(Protocol):
    """Evaluates the genomes of one request.

    ``evaluate`` is called by :func:`~evosearch.engine.search` once per request with the
    genomes not yet memoised (distinct, in request order); it yields one :class:`Outcome` per
    genome in the same order and must not change ``evaluator``'s cache or counters.
    """

    def evaluate(
        self, evaluator, genomes: Sequence[Genome], batch: Batch
    ) -> Iterator[Outcome]: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Evaluate in this process, one genome after another, on ``evaluator``'s resident model."""

    def evaluate(self, evaluator, genomes: Sequence[Genome], batch: Batch) -> Iterator[Outcome]:
        for genome in genomes:
            yield evaluator.outcome(genome, batch)

    def close(self) -> None:
        pass

    def __enter__(self) -> InProcessRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerLostError(RuntimeError):
    """A candidate's worker died more often than ``RayRunnerConfig.max_retries`` allows."""


@dataclass(frozen=True, kw_only=True)
class RayRunnerConfig:
    """Where and how a :class:`RayRunner` runs its evaluator actors.

    Args:
        workers: evaluator actors in the pool.
        address: ``None`` starts a local Ray instance (or uses the one this process already
            joined); ``"auto"`` joins the cluster started on this machine by ``ray start``;
            ``"host:port"`` or ``"ray://host:10001"`` joins that cluster. A process that has
            already called ``ray.init`` keeps that connection, whatever ``address`` says.
        num_cpus: CPUs Ray reserves per worker (fractions allowed; 0 for workers that wait on
            something other than the CPU).
        num_gpus: GPUs per worker; fractions pack several workers onto one GPU.
        torch_threads: ``torch.set_num_threads`` in each worker; default
            ``max(1, int(num_cpus))`` so that workers do not oversubscribe their CPUs.
        max_retries: how often one candidate may lose its worker (killed process, lost node)
            and be re-run on a replacement before the search stops with
            :class:`WorkerLostError`.
        in_flight: candidates queued per worker; more than one hides the scheduling round trip.
        start_timeout_s: how long to wait for the pool to start (e.g. for resources) before
            giving up with a clear error rather than hanging.
        shard: split the batches of an additive fitness across workers when a request's
            candidates do not divide evenly among them (module docstring).
    """

    workers: int = 2
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int | None = None
    max_retries: int = 3
    in_flight: int = 2
    start_timeout_s: float = 600.0
    shard: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {self.in_flight}")
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {self.start_timeout_s}")
        if self.address is not None and not self.address:
            raise ValueError("address must be None (local), 'auto', 'host:port' or 'ray://...'")

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))


def plan_shards(units: Sequence[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """Cut work into ``parts`` contiguous pieces of equal size (to one unit).

    Args:
        units: work units (micro batches) of each candidate, laid end to end in this order.
        parts: pieces to cut (workers).

    Returns:
        Per piece, its ``(candidate, first unit, end unit)`` ranges (a piece may span the end
        of one candidate and the start of the next; empty pieces are empty lists).

    Example::

        >>> plan_shards([4, 4, 4], 4)
        [[(0, 0, 3)], [(0, 3, 4), (1, 0, 2)], [(1, 2, 4), (2, 0, 1)], [(2, 1, 4)]]
    """
    total = sum(units)
    offsets = [0]
    for n in units:
        offsets.append(offsets[-1] + n)
    out: list[list[tuple[int, int, int]]] = []
    for p in range(parts):
        lo, hi = total * p // parts, total * (p + 1) // parts
        piece = []
        for i, n in enumerate(units):
            a, b = max(lo, offsets[i]), min(hi, offsets[i] + n)
            if a < b:
                piece.append((i, a - offsets[i], b - offsets[i]))
        out.append(piece)
    return out


class _EvaluatorActor:
    """The body of one Ray worker: an evaluator built once, then many evaluations."""

    def __init__(self, factory: Callable[..., Any], torch_threads: int, **shared: Any) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.evaluator = factory(**shared)
        self._request: int | None = None  # the request whose batch is cached
        self._batch: Batch | None = None

    def where(self) -> tuple[int, str]:
        """``(process id, Ray node id)`` of this worker."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def shard_traits(self) -> tuple[bool, int]:
        """``(additive, shard_rows)`` of this worker's evaluator: whether its fitness returns
        partial sums, and the rows a shard must be a multiple of."""
        additive = bool(getattr(self.evaluator, "additive", False))
        return additive, int(getattr(self.evaluator, "shard_rows", 1))

    def evaluate(self, genome: Genome, request: int, batch_box: list) -> Outcome:
        """Evaluate on request ``request``'s batch, fetched from the object store once per
        request (``batch_box`` holds its reference, boxed so that Ray does not fetch it for
        every task)."""
        if self._request != request:
            import ray

            self._batch, self._request = ray.get(batch_box[0]), request
        return self.evaluator.outcome(genome, self._batch)

    def evaluate_part(
        self, genome: Genome, request: int, batch_box: list, start: int, stop: int
    ) -> Outcome:
        """Partial sums of an additive fitness on rows ``start:stop`` of the request's batch."""
        if self._request != request:
            import ray

            self._batch, self._request = ray.get(batch_box[0]), request
        return self.evaluator.partial_outcome(genome, self._batch.rows(start, stop))


class RayRunner:
    """A pool of Ray actors, each holding an evaluator built once by ``factory``.

    Args:
        factory: picklable callable run once in every worker (and again in a replacement) as
            ``factory(**shared)``; returns an object with ``outcome(genome, batch) ->
            Outcome``, normally an :class:`~evosearch.engine.Evaluator` on the worker's own
            copy of the model.
        shared: large read-only objects (tokens, dense cache, level databases) put into the
            object store once and handed to ``factory`` by name in every worker.
        config: pool size, cluster address and per-worker resources.

    Example::

        with RayRunner(MyFactory(model_dir), shared={"input_ids": ids},
                       config=RayRunnerConfig(workers=4)) as runner:
            result = search(strategy, evaluator, data, runner=runner)
    """

    def __init__(
        self,
        factory: Callable[..., Any],
        *,
        shared: Mapping[str, Any] | None = None,
        config: RayRunnerConfig | None = None,
    ) -> None:
        import ray

        self.config = config or RayRunnerConfig()
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            import logging

            ray.init(address=self.config.address, logging_level=logging.WARNING)
            self._owns_ray = True
        try:
            self._check_resources()
            self._factory = ray.put(factory)
            self._shared = {name: ray.put(obj) for name, obj in (shared or {}).items()}
            self._actor_cls = ray.remote(_EvaluatorActor).options(
                num_cpus=self.config.num_cpus,
                num_gpus=self.config.num_gpus,
                max_restarts=0,  # replacements are made here, so retries stay bounded per task
                max_concurrency=1,
            )
            self.actors = [self._new_actor() for _ in range(self.config.workers)]
            self._where = self._wait_ready(self.actors)
            self._traits = ray.get(self.actors[0].shard_traits.remote())
            self.replaced = 0  # workers replaced after dying
            self.sharded = 0  # requests whose batches were split across workers
            self._requests = 0
        except BaseException:
            self.close()
            raise

    def _check_resources(self) -> None:
        if self.config.address is not None:
            return  # a cluster may autoscale; start_timeout_s bounds the wait instead
        total = self._ray.cluster_resources()
        for key, per in (("CPU", self.config.num_cpus), ("GPU", self.config.num_gpus)):
            need = per * self.config.workers
            if need > total.get(key, 0.0) + 1e-9:
                raise ValueError(
                    f"{self.config.workers} workers x {per} {key}s = {need:g} {key}s, but the "
                    f"local Ray instance has {total.get(key, 0.0):g}; use fewer workers or "
                    f"fewer {key}s per worker"
                )

    def _new_actor(self):
        return self._actor_cls.remote(self._factory, self.config.threads, **self._shared)

    def _wait_ready(self, actors) -> list[tuple[int, str]]:
        ray = self._ray
        try:
            return ray.get([a.where.remote() for a in actors], timeout=self.config.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"{len(actors)} Ray worker(s) with {self.config.num_cpus} CPUs and "
                f"{self.config.num_gpus} GPUs each did not start within "
                f"{self.config.start_timeout_s:g}s; does the cluster have the resources?"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"a Ray worker failed to build its evaluator: {exc}") from exc

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (tests kill one to check fault tolerance)."""
        return [pid for pid, _ in self._where]

    def worker_nodes(self) -> list[str]:
        """Ray node ids of the current workers."""
        return [node for _, node in self._where]

    def evaluate(self, evaluator, genomes: Sequence[Genome], batch: Batch) -> Iterator[Outcome]:
        """Evaluate ``genomes`` on ``batch`` across the pool; outcomes in ``genomes`` order.

        ``evaluator`` is the driver's: the workers evaluate on their own, and it only combines
        shards (``combine``); batches are sharded when it and the workers' evaluators are both
        additive and ``config.shard`` is on.
        The batch goes to the object store once per request and each worker fetches it once
        per request. An exception the worker's evaluator does not turn into a failed
        :class:`Outcome` is re-raised here, as it would be in process.
        """
        if not genomes:
            return
        self._requests += 1
        request, batch_box = self._requests, [self._ray.put(batch)]
        workers = len(self.actors)
        if (
            self.config.shard
            and self._traits[0]
            and getattr(evaluator, "additive", False)
            and len(genomes) % workers != 0
        ):
            self.sharded += 1
            yield from self._evaluate_sharded(evaluator, genomes, batch, request, batch_box)
        else:
            yield from self._evaluate_whole(genomes, request, batch_box)

    def _evaluate_whole(
        self, genomes: Sequence[Genome], request: int, batch_box: list
    ) -> Iterator[Outcome]:
        """One task per genome, each to the least loaded worker."""
        results: list[Outcome | None] = [None] * len(genomes)
        attempts = [0] * len(genomes)
        queue = deque(range(len(genomes)))
        in_flight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (index, slot, actor)
        load = [0] * len(self.actors)
        next_out = 0
        while queue or in_flight:
            while queue:  # keep every worker's queue topped up
                slot = min(range(len(self.actors)), key=load.__getitem__)
                if load[slot] >= self.config.in_flight:
                    break
                i = queue.popleft()
                actor = self.actors[slot]
                ref = actor.evaluate.remote(genomes[i], request, batch_box)
                in_flight[ref] = (i, slot, actor)
                load[slot] += 1
            for (i, slot, _), outcome in self._finished(in_flight, attempts, genomes):
                load[slot] -= 1
                if outcome is None:  # its worker died: re-run it on any worker
                    queue.appendleft(i)
                else:
                    results[i] = outcome
            while next_out < len(results) and results[next_out] is not None:
                yield results[next_out]
                next_out += 1

    def _evaluate_sharded(
        self, evaluator, genomes: Sequence[Genome], batch: Batch, request: int, batch_box: list
    ) -> Iterator[Outcome]:
        """Equal pieces of all genomes' rows, one per worker, combined per genome."""
        rows = len(batch.indices)
        unit = max(1, self._traits[1])
        units = -(-rows // unit)
        plan = plan_shards([units] * len(genomes), len(self.actors))
        tasks = [  # (genome, first row, end row, worker slot)
            (i, a * unit, min(b * unit, rows), slot)
            for slot, piece in enumerate(plan)
            for i, a, b in piece
        ]
        parts: list[dict[int, Outcome]] = [{} for _ in genomes]
        need = [sum(1 for t in tasks if t[0] == i) for i in range(len(genomes))]
        attempts = [0] * len(tasks)
        in_flight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (task, slot, actor)

        def submit(t: int) -> None:
            i, a, b, slot = tasks[t]
            actor = self.actors[slot]
            ref = actor.evaluate_part.remote(genomes[i], request, batch_box, a, b)
            in_flight[ref] = (t, slot, actor)

        for t in range(len(tasks)):
            submit(t)
        results: list[Outcome | None] = [None] * len(genomes)
        next_out = 0
        task_genomes = [genomes[task[0]] for task in tasks]
        while in_flight:
            for (t, _, _), outcome in self._finished(in_flight, attempts, task_genomes):
                if outcome is None:  # its worker died: re-run the piece on the replacement
                    submit(t)
                    continue
                i, a = tasks[t][0], tasks[t][1]
                parts[i][a] = outcome
                if len(parts[i]) == need[i]:
                    results[i] = evaluator.combine([parts[i][k] for k in sorted(parts[i])])
            while next_out < len(results) and results[next_out] is not None:
                yield results[next_out]
                next_out += 1

    def _finished(self, in_flight: dict, attempts: list[int], genomes: Sequence[Genome]):
        """Wait for at least one task of ``in_flight`` (``ref -> (task, slot, actor)``) and
        yield ``(entry, outcome)`` for each finished one, removed from ``in_flight``;
        ``outcome`` is ``None`` when the task's worker died (it is then replaced, once)."""
        ray = self._ray
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            entry = in_flight.pop(ref)
            t, slot, actor = entry
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                attempts[t] += 1
                if attempts[t] > self.config.max_retries:
                    raise WorkerLostError(
                        f"candidate {genomes[t].key()} lost its Ray worker "
                        f"{attempts[t]} times (max_retries={self.config.max_retries}); "
                        f"last error: {exc}"
                    ) from exc
                if self.actors[slot] is actor:  # first news of this death: replace it
                    self._replace(slot)
                outcome = None
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
            yield entry, outcome

    def _replace(self, slot: int) -> None:
        ray = self._ray
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        self._where[slot] = self._wait_ready([self.actors[slot]])[0]
        self.replaced += 1

    def close(self) -> None:
        """Stop the workers, and the local Ray instance if this runner started it."""
        ray = self._ray
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
