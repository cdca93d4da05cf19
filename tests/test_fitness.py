"""fitness: KL divergence from the dense model and perplexity, against references computed
directly from full logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import N_LAYERS, build_model, logits, token_data

from evosearch.engine import Evaluator, sample_batch
from evosearch.evaluation import Batch, Candidate, Fitness
from evosearch.forward import compute_dense_cache
from evosearch.models import remove_blocks
from fitness import KLDivergence, Perplexity, get_fitness
from search_spaces import LayerDropSpace


def _reference_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean over positions of KL(p_teacher || q_student), via torch's own kl_div."""
    log_p = F.log_softmax(teacher_logits.double(), dim=-1)
    log_q = F.log_softmax(student_logits.double(), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (B, T)
    return kl.mean().item()


def _reference_ppl(model_logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    vocab = model_logits.shape[-1]
    nll = F.cross_entropy(
        model_logits[:, :-1].reshape(-1, vocab).double(), input_ids[:, 1:].reshape(-1)
    )
    return math.exp(nll.item())


def _prepared(model, fitness, data):
    dense = compute_dense_cache(model, data.input_ids, micro_batch=4)
    fitness.prepare(model, data.input_ids, dense)
    return dense


def test_builtin_fitnesses_follow_the_protocol():
    assert isinstance(KLDivergence(), Fitness)
    assert isinstance(Perplexity(), Fitness)
    assert KLDivergence.direction == Perplexity.direction == "minimize"


def test_get_fitness_by_name():
    assert isinstance(get_fitness("kl"), KLDivergence)
    assert isinstance(get_fitness("ppl", micro_batch=2), Perplexity)
    assert get_fitness("ppl", micro_batch=2).micro_batch == 2
    with pytest.raises(ValueError, match="kl"):
        get_fitness("accuracy")


@pytest.mark.parametrize("cls", [KLDivergence, Perplexity])
def test_micro_batch_is_validated(cls):
    with pytest.raises(ValueError, match="micro_batch"):
        cls(micro_batch=0)


def test_kl_of_the_dense_model_is_zero_and_positive_after_dropping(llama):
    data = token_data(6, 8)
    kl = KLDivergence(micro_batch=4)
    dense = _prepared(llama, kl, data)
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    batch = sample_batch(data, 48, seed=0, generation=0, stage=0)
    unchanged = LayerDropSpace(N_LAYERS, num_drop=0)
    full_forward = Evaluator(llama, unchanged, kl, dense, prefix_reuse=False)
    assert abs(full_forward.raw(unchanged.from_dropped(), batch)) < 1e-6
    evaluator = Evaluator(llama, space, kl, dense, prefix_reuse=False)
    assert evaluator.raw(space.from_dropped(blocks=[1]), batch) > 1e-4


def test_kl_without_prepare_raises(llama):
    data = token_data(2, 6)
    batch = Batch((0, 1), data.input_ids)
    with pytest.raises(RuntimeError, match="prepare"):
        KLDivergence()(Candidate(llama, LayerDropSpace(4, num_drop=0).from_dropped()), batch)


def test_kl_matches_a_direct_computation_from_full_logits(tiny_model):
    data = token_data(5, 9)
    kl = KLDivergence(micro_batch=2)
    dense = _prepared(tiny_model, kl, data)
    space = LayerDropSpace(N_LAYERS, num_drop=2)
    genome = space.from_dropped(blocks=[1, 3])
    batch = sample_batch(data, 27, seed=1, generation=0, stage=0)  # 3 of the 5 rows
    value = Evaluator(tiny_model, space, kl, dense).raw(genome, batch)

    dropped = remove_blocks(copy.deepcopy(tiny_model), {1, 3})
    reference = _reference_kl(
        logits(tiny_model, batch.input_ids), logits(dropped, batch.input_ids)
    )
    assert value == pytest.approx(reference, rel=1e-4)
    assert value > 0


def test_kl_teacher_comes_from_the_prepared_cache(llama):
    """The teacher is whatever ``prepare`` cached: a cache of another model's activations
    gives the KL from that model, even for the unchanged candidate."""
    data = token_data(4, 8)
    batch = Batch((0, 1, 2, 3), data.input_ids)
    other = build_model("llama", seed=1)
    other.lm_head = llama.lm_head  # same head, different body
    kl = KLDivergence()
    kl.prepare(llama, data.input_ids, compute_dense_cache(other, data.input_ids))
    genome = LayerDropSpace(N_LAYERS, num_drop=0).from_dropped()
    value = kl(Candidate(llama, genome), batch)
    reference = _reference_kl(logits(other, data.input_ids), logits(llama, data.input_ids))
    assert value == pytest.approx(reference, rel=1e-4)
    assert value > 1e-3


def test_kl_does_not_depend_on_the_micro_batch(llama):
    data = token_data(5, 8)
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    genome = space.from_dropped(blocks=[2])
    batch = Batch(tuple(range(5)), data.input_ids)
    values = []
    for micro_batch in (1, 2, 5):
        kl = KLDivergence(micro_batch=micro_batch)
        dense = _prepared(llama, kl, data)
        values.append(Evaluator(llama, space, kl, dense).raw(genome, batch))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert values[0] == pytest.approx(values[2], rel=1e-5)


@pytest.mark.parametrize("dropped", [(), (0, 2)], ids=["dense", "drop-0-2"])
def test_perplexity_equals_exp_cross_entropy(tiny_model, dropped):
    data = token_data(5, 10)
    ppl = Perplexity(micro_batch=2)
    dense = _prepared(tiny_model, ppl, data)
    space = LayerDropSpace(N_LAYERS, num_drop=len(dropped))
    batch = Batch(tuple(range(5)), data.input_ids)
    value = Evaluator(tiny_model, space, ppl, dense).raw(space.from_dropped(blocks=dropped), batch)

    reference_model = remove_blocks(copy.deepcopy(tiny_model), set(dropped))
    reference = _reference_ppl(logits(reference_model, data.input_ids), data.input_ids)
    assert value == pytest.approx(reference, rel=1e-4)
    # the model's own loss (labels = input ids, shifted inside) agrees as well
    with torch.no_grad():
        loss = reference_model(input_ids=data.input_ids, labels=data.input_ids).loss
    assert value == pytest.approx(math.exp(loss.item()), rel=1e-4)
