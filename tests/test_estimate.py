"""The elite's pooled estimate, its standard error, the flip rate and the progress line."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import N_LAYERS, build_model, token_data

from evosearch.engine import Evaluator, elite_estimate, sample_batch, search, selection_note
from evosearch.estimate import flip_rate, pooled
from evosearch.forward import compute_dense_cache
from evosearch.genome import Genome
from evosearch.strategies import EvoPress, EvoPressConfig, Stage
from fitness.kl import KLDivergence
from fitness.perplexity import Perplexity
from search_spaces import LayerDropSpace


def test_pooled_mean_and_standard_error_by_hand():
    parts = [(2.0, 4.0), (6.0, 4.0), (1.0, 2.0)]  # per-token means 0.5, 1.5, 0.5
    est = pooled(parts)
    assert est.value == pytest.approx(9.0 / 10.0)
    assert est.tokens == 10.0 and est.sequences == 3
    m = 0.9
    residuals = [2.0 - m * 4, 6.0 - m * 4, 1.0 - m * 2]  # -1.6, 2.4, -0.8
    se = math.sqrt(3 / 2 * sum(r * r for r in residuals)) / 10.0
    assert est.se == pytest.approx(se)
    # equal token counts: the standard error of the mean of the sequence means
    means = [0.2, 0.4, 0.9, 0.5]
    est = pooled([(x * 8, 8.0) for x in means])
    assert est.value == pytest.approx(np.mean(means))
    assert est.se == pytest.approx(np.std(means, ddof=1) / math.sqrt(len(means)))


def test_pooled_through_a_nonlinear_reduce_and_with_one_sequence():
    est = pooled([(2.0, 4.0), (6.0, 4.0)], reduce=lambda t, c: math.exp(t / c))
    assert est.value == pytest.approx(math.exp(1.0))
    plain = pooled([(2.0, 4.0), (6.0, 4.0)])
    assert est.se == pytest.approx(math.exp(1.0) * plain.se, rel=0.2)  # the delta method
    single = pooled([(3.0, 6.0)])
    assert single.value == 0.5 and single.se is None
    with pytest.raises(ValueError):
        pooled([])


def test_flip_rate_is_zero_for_a_clear_winner_and_large_for_a_tie():
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.05, size=(3, 32))
    clear = [[(1.0 + d + 0.5 * k, 1.0) for d in noise[k]] for k in range(3)]
    assert flip_rate(clear, np.random.default_rng(1)) == 0.0
    centred = noise - noise.mean(axis=1, keepdims=True)  # the same mean, other noise
    tied = [[(1.0 + d, 1.0) for d in centred[k]] for k in range(3)]
    assert flip_rate(tied, np.random.default_rng(1)) > 0.3
    # a maximised fitness: the largest wins
    assert flip_rate(clear, np.random.default_rng(1), sign=-1.0) == 0.0
    assert flip_rate(clear[:1], np.random.default_rng(1)) is None  # nothing to flip to


def test_selection_note_is_the_progress_lines_part():
    stats = {"elite_value": 0.73012, "elite_se": 0.01234, "elite_tokens": 6144.0}
    assert selection_note(stats) == "  elite 0.7301 ± 0.0123 (6144 tok)"
    stats["flip_rate"] = 0.125
    assert selection_note(stats) == "  elite 0.7301 ± 0.0123 (6144 tok)  flip 12%"
    assert selection_note({"elite_value": 1.0, "elite_se": None, "elite_tokens": 8.0}) == (
        "  elite 1.0000 (8 tok)"
    )
    assert selection_note({}) == ""


@pytest.fixture
def drop_search():
    model = build_model("llama")
    data = token_data(8, 8)
    dense = compute_dense_cache(model, data.input_ids)
    kl = KLDivergence(micro_batch=2)
    kl.prepare(model, data.input_ids, dense)
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    return model, data, dense, kl, space


def test_the_search_reports_the_elites_pooled_estimate_and_the_flip_rate(drop_search):
    model, data, dense, kl, space = drop_search
    config = EvoPressConfig(
        generations=3,
        offspring=3,
        initial_population=3,
        stages=(Stage(tokens=16, survivors=2), Stage(tokens=32, survivors=1)),
    )
    lines = []
    evaluator = Evaluator(model, space, kl, dense)
    strategy = EvoPress(space, config=config, rng=np.random.default_rng(0))
    result = search(strategy, evaluator, data, seed=0, progress=lines.append)
    last = result.history[-1]
    # pooled by hand from the log: the elite's distinct sequences over all its batches
    rows = {}
    for record in result.evaluations:
        if record["genome"] == last["best"]:
            for row, part in zip(record["batch"].split(","), record["sequences"]):
                rows.setdefault(row, tuple(part))
    expected = pooled(list(rows.values()))
    assert last["elite_value"] == pytest.approx(expected.value)
    assert last["elite_se"] == pytest.approx(expected.se)
    assert last["elite_tokens"] == expected.tokens > 32  # more than the last batch alone
    assert 0.0 <= last["flip_rate"] <= 1.0
    assert f"elite {last['elite_value']:.4f} ± {last['elite_se']:.4f}" in lines[-1]
    assert "flip " in lines[-1]
    # the per-batch value is kept beside it, and matches its own batch
    assert last["value"] == pytest.approx(result.best_value)


def test_elite_estimate_without_per_sequence_sums_weights_batches_by_tokens(drop_search):
    model, data, dense, _, space = drop_search
    plain = Evaluator(model, space, lambda m, b: float(b.input_ids.float().mean()), dense)
    genome = Genome((1,) + (0,) * (N_LAYERS - 1))
    plain.cache.update({(genome.key(), "0,1"): 2.0, (genome.key(), "2,3,4,5"): 5.0})
    est = elite_estimate(plain, genome, seq_len=8)
    assert est.value == pytest.approx((2.0 * 16 + 5.0 * 32) / 48)
    assert est.tokens == 48


def test_perplexity_per_sequence_sums_add_up_to_its_partial(drop_search):
    model, data, dense, _, space = drop_search
    ppl = Perplexity(micro_batch=3)
    evaluator = Evaluator(model, space, ppl, dense)
    genome = Genome((0, 1) + (0,) * (N_LAYERS - 2))
    batch = sample_batch(data, 40, seed=0, generation=0, stage=0)
    outcome = evaluator.outcome(genome, batch)
    assert len(outcome.sequences) == len(batch.indices)
    assert all(c == data.seq_len - 1 for _, c in outcome.sequences)
    total = sum(t for t, _ in outcome.sequences)
    assert outcome.value == pytest.approx(math.exp(total / (len(batch.indices) * 7)))


def test_the_run_summary_says_how_sure_the_last_choice_was():
    from evosearch.config import SearchConfig
    from evosearch.jobs.report import selection_line
    from evosearch.jobs.search import selection_summary

    history = [
        {"generation": 0, "value": 0.9, "flip_rate": 0.5},
        {"generation": 1, "value": 0.8, "elite_value": 0.7, "elite_se": 0.01},
    ]
    history[1].update(elite_tokens=4096.0, flip_rate=0.25)
    summary = selection_summary(history)
    assert summary == {
        "elite_value": 0.7,
        "elite_se": 0.01,
        "elite_tokens": 4096.0,
        "flip_rate": 0.25,
        "flip_rate_mean": 0.375,
    }
    config = SearchConfig()
    line = selection_line(summary, config)
    assert line.startswith("selection: the last stage's winner changes in 25% of resampled ")
    assert "give the last stage more tokens" in line
    assert line.endswith("best kl 0.7000 ± 0.0100 pooled over 4096 tokens")
    assert "more tokens" not in selection_line({**summary, "flip_rate": 0.0}, config)
    assert selection_line({}, config) is None and selection_summary([]) == {}


def test_sums_that_do_not_reduce_to_the_fitness_value_are_not_kept(drop_search):
    model, data, dense, kl, space = drop_search

    class Shifted(KLDivergence):  # a subclass that changes the value after the sums
        def __call__(self, candidate, batch):
            return super().__call__(candidate, batch) + 1.0

    shifted = Shifted(micro_batch=2)
    shifted.prepare(model, data.input_ids, dense)
    genome = Genome((0, 1) + (0,) * (N_LAYERS - 2))
    batch = sample_batch(data, 32, seed=0, generation=0, stage=0)
    plain = Evaluator(model, space, kl, dense).outcome(genome, batch)
    changed = Evaluator(model, space, shifted, dense).outcome(genome, batch)
    assert plain.sequences is not None and changed.sequences is None
    assert changed.value == pytest.approx(plain.value + 1.0)
