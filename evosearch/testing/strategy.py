"""The :class:`~evosearch.strategy.Strategy` contract as plain checks, one per promise.

Each check takes ``make(seed) -> Strategy`` (a fresh strategy, built the same way for the same
seed, with a few short generations) and drives it without a model: the fitness of a genome is
a pseudo-random number of its key (:func:`toy_value`), a few of them ``inf`` (a failed
evaluation), so the checks run in milliseconds against any strategy and any genome type.

Example (pytest)::

    from evosearch.testing.strategy import CHECKS

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_my_strategy_keeps_the_contract(check):
        check(lambda seed: MyStrategy(rng=np.random.default_rng(seed)))
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable

from evosearch.strategy import Request, Strategy

__all__ = [
    "CHECKS",
    "check_ask_repeats_until_told",
    "check_deterministic",
    "check_protocol",
    "check_runs_to_completion",
    "check_state_dict_resumes",
    "check_tell_refuses_a_wrong_answer",
    "drive",
    "toy_value",
]

Make = Callable[[int], Strategy]


def toy_value(genome) -> float:
    """A deterministic pseudo-random fitness of ``genome.key()`` in [0, 1); ``inf`` (failed) for
    about one key in eight."""
    h = zlib.crc32(genome.key().encode())
    return math.inf if h % 8 == 0 else (h % 10007) / 10007


def drive(strategy: Strategy, *, stop_after: int | None = None) -> list[tuple[Request, list]]:
    """Ask and tell with :func:`toy_value` until done (or until generation ``stop_after`` is
    finished); returns every request with its values."""
    log = []
    while (request := strategy.ask()) is not None:
        values = [toy_value(g) for g in request.genomes]
        log.append((request, values))
        strategy.tell(request, values)
        if stop_after is not None and strategy.generation > stop_after:
            break
    return log


def _keys(log: list[tuple[Request, list]]) -> list[tuple[int, int, int, list[str]]]:
    return [(r.generation, r.stage, r.tokens, [g.key() for g in r.genomes]) for r, _ in log]


def check_protocol(make: Make) -> None:
    """A fresh strategy has every member of the protocol and has told nothing."""
    s = make(0)
    assert isinstance(s, Strategy), f"{type(s).__name__} lacks a member of Strategy"
    assert s.generation == 0 and not s.done and s.best is None and s.history == []


def check_runs_to_completion(make: Make) -> None:
    """Requests hold hashable genomes with string keys; generations count up one at a time; at
    the end ``done`` holds, ``ask`` returns ``None`` and ``best``/``history`` agree with what
    was told."""
    s = make(0)
    log = drive(s)
    assert log and s.done and s.ask() is None
    told = {(g.key(), v) for r, values in log for g, v in zip(r.genomes, values)}
    last = -1
    for request, _ in log:
        assert isinstance(request, Request) and request.genomes and request.tokens >= 1
        assert request.generation in (last, last + 1)
        last = request.generation
        for g in request.genomes:
            assert isinstance(g.key(), str) and hash(g) == hash(g)
    assert s.generation == last + 1 == len(s.history)
    genome, value = s.best
    assert math.isfinite(value) and (genome.key(), value) in told
    assert [h["generation"] for h in s.history] == list(range(len(s.history)))
    assert s.history[-1]["best"] == genome.key() and s.history[-1]["value"] == value
    assert all({"generation", "best", "value", "tokens"} <= set(h) for h in s.history)


def check_ask_repeats_until_told(make: Make) -> None:
    """``ask`` twice without a ``tell`` gives the same request, and the run is unchanged."""
    s, ref = make(0), drive(make(0))
    assert s.ask() == s.ask() == ref[0][0]


def check_tell_refuses_a_wrong_answer(make: Make) -> None:
    """A wrong number of values, or another generation's request, raises and changes nothing:
    the run then goes on exactly as an undisturbed one."""
    s, ref = make(0), drive(make(0))
    request = s.ask()
    values = [toy_value(g) for g in request.genomes]
    for bad in (values + [1.0], values[:-1]):
        try:
            s.tell(request, bad)
        except (ValueError, RuntimeError):
            pass
        else:
            raise AssertionError(f"tell() accepted {len(bad)} values for {len(values)} genomes")
    stale = Request(request.generation + 1, request.stage, request.tokens, request.genomes)
    try:
        s.tell(stale, values)
    except RuntimeError:
        pass
    else:
        raise AssertionError("tell() accepted a request that was not asked")
    s.tell(request, values)
    assert _keys([(request, values)] + drive(s)) == _keys(ref)


def check_deterministic(make: Make) -> None:
    """The same seed gives the same requests and the same best."""
    a, b = make(0), make(0)
    assert _keys(drive(a)) == _keys(drive(b))
    assert a.best[0].key() == b.best[0].key() and a.best[1] == b.best[1]


def check_state_dict_resumes(make: Make) -> None:
    """``state_dict`` after a finished generation is JSON-able, and a fresh strategy that loads
    it asks the same requests as the uninterrupted one and ends with the same best and
    history."""
    full = make(0)
    ref = drive(full)
    first = make(0)
    head = drive(first, stop_after=0)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make(0)
    resumed.load_state_dict(state)
    assert resumed.generation == first.generation
    assert _keys(head + drive(resumed)) == _keys(ref)
    assert resumed.best[0].key() == full.best[0].key() and resumed.best[1] == full.best[1]
    assert json.dumps(resumed.history) == json.dumps(full.history)


CHECKS: tuple[Callable[[Make], None], ...] = (
    check_protocol,
    check_runs_to_completion,
    check_ask_repeats_until_told,
    check_tell_refuses_a_wrong_answer,
    check_deterministic,
    check_state_dict_resumes,
)
