"""Cheaper evaluations (issue 24): the compute dtype, the top-k teacher KL and additive
fitnesses whose batches may be split into shards and combined."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import N_LAYERS, VOCAB, build_model, token_data

from evosearch.engine import Evaluator
from evosearch.evaluation import Batch, Candidate, is_additive
from evosearch.forward import bf16_supported, compute_dense_cache, resolve_dtype
from fitness import KLDivergence, Perplexity
from fitness.kl import build_teacher, topk_kl
from search_spaces import LayerDropSpace


def _prepared(model, fitness, data, dtype="float32"):
    dense = compute_dense_cache(model, data.input_ids, dtype=dtype)
    fitness.prepare(model, data.input_ids, dense)
    return dense


def _full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(teacher_logits.double(), dim=-1)
    log_q = F.log_softmax(student_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _teacher_of(logits: torch.Tensor, k: int):
    """A top-k teacher of ``(n, V)`` logits, built through an identity 'head'."""
    head = torch.nn.Linear(logits.shape[-1], logits.shape[-1], bias=False)
    head.weight.data = torch.eye(logits.shape[-1])
    return build_teacher(head, logits[None], k, chunk_tokens=5)


# -- the dtype -------------------------------------------------------------------------------


def test_resolve_dtype_names_and_auto():
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    auto = resolve_dtype("auto", "cpu")
    assert auto == (torch.bfloat16 if bf16_supported("cpu") else torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(torch.int8, "cpu")


def test_evaluator_takes_the_dense_caches_dtype(llama):
    data = token_data(2, 8)
    kl = KLDivergence()
    dense = _prepared(llama, kl, data, dtype="bfloat16")
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    assert Evaluator(llama, space, kl, dense).compute_dtype == torch.bfloat16
    assert Evaluator(llama, space, kl, dense, dtype="float32").compute_dtype == torch.float32
    assert Evaluator(llama, space, kl).compute_dtype == torch.float32


def test_bf16_is_close_to_float32_and_prefix_reuse_stays_exact(llama):
    data = token_data(4, 16)
    batch = Batch(tuple(range(4)), data.input_ids)
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    genome = space.from_dropped(blocks=[2])
    values = {}
    for dtype in ("float32", "bfloat16"):
        kl = KLDivergence()
        dense = _prepared(llama, kl, data, dtype=dtype)
        for reuse in (True, False):
            values[dtype, reuse] = Evaluator(llama, space, kl, dense, reuse).raw(genome, batch)
    assert values["bfloat16", True] == values["bfloat16", False]
    assert values["bfloat16", True] == pytest.approx(values["float32", True], rel=0.05)
    assert next(llama.parameters()).dtype == torch.float32  # autocast, not a cast


# -- the top-k teacher -----------------------------------------------------------------------


def test_topk_kl_equals_full_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    teacher, student = 3 * torch.randn(7, 50), 3 * torch.randn(7, 50)
    t = _teacher_of(teacher, 50)
    assert torch.isinf(t.log_rest).all() and (t.log_rest < 0).all()
    kl = topk_kl(t.log_probs[0], t.indices[0].long(), t.log_rest[0], student)
    assert kl.double() == pytest.approx(_full_kl(teacher, student), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("k", [1, 3, 10, 49])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_topk_kl_is_never_negative_and_bounded_by_the_full_kl(k, scale):
    torch.manual_seed(k)
    teacher = scale * torch.randn(64, 50)
    for student in (scale * torch.randn(64, 50), teacher.clone(), teacher + 1e-4):
        t = _teacher_of(teacher, k)
        kl = topk_kl(t.log_probs[0], t.indices[0].long(), t.log_rest[0], student)
        assert (kl >= 0).all()
        full = _full_kl(teacher, student)
        assert (kl.double() <= full * (1 + 1e-5) + 1e-5).all()  # data processing inequality
    assert kl.max() < 1e-3  # nearly the teacher itself


def test_topk_kl_with_k_at_the_vocabulary_matches_the_reference_path(tiny_model):
    data = token_data(5, 9)
    batch = Batch((0, 2, 4), data.input_ids[[0, 2, 4]])
    space = LayerDropSpace(N_LAYERS, num_drop=2)
    genome = space.from_dropped(blocks=[1, 3])
    values = []
    for top_k in (None, VOCAB, 10 * VOCAB):
        kl = KLDivergence(top_k=top_k, micro_batch=2, chunk_tokens=7)
        dense = _prepared(tiny_model, kl, data)
        values.append(Evaluator(tiny_model, space, kl, dense).raw(genome, batch))
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert values[2] == pytest.approx(values[0], rel=1e-5)
    small = KLDivergence(top_k=5)
    dense = _prepared(tiny_model, small, data)
    assert 0 <= Evaluator(tiny_model, space, small, dense).raw(genome, batch) <= values[0]


def test_chunk_size_does_not_change_the_kl(llama):
    data = token_data(3, 10)
    batch = Batch((0, 1, 2), data.input_ids)
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    genome = space.from_dropped(blocks=[0])
    values = []
    for chunk in (1, 7, 1000):
        kl = KLDivergence(top_k=20, chunk_tokens=chunk)
        dense = _prepared(llama, kl, data)
        values.append(Evaluator(llama, space, kl, dense).raw(genome, batch))
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert values[2] == pytest.approx(values[0], rel=1e-5)


def test_the_teacher_is_derived_once_and_travels_with_the_dense_cache(llama):
    data = token_data(3, 8)
    kl = KLDivergence(top_k=16)
    dense = _prepared(llama, kl, data)
    teacher = dense.derived["kl.top16"]
    assert teacher.log_probs.shape == (3, 8, 16) and teacher.indices.dtype == torch.int32
    assert kl.teacher_bytes_per_token() == 16 * 8 + 4
    again = KLDivergence(top_k=16)
    again.prepare(llama, data.input_ids, dense)
    assert again._teacher is teacher


@pytest.mark.parametrize("kwargs", [{"top_k": 0}, {"chunk_tokens": 0}])
def test_kl_settings_are_validated(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        KLDivergence(**kwargs)


# -- additive fitnesses: shards combine exactly ----------------------------------------------


@pytest.mark.parametrize("fitness_cls", [KLDivergence, Perplexity])
def test_shards_of_a_batch_combine_to_the_whole(llama, fitness_cls):
    data = token_data(5, 8)
    fitness = fitness_cls(micro_batch=2)
    dense = _prepared(llama, fitness, data)
    assert is_additive(fitness)
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    genome = space.from_dropped(blocks=[1])
    batch = Batch(tuple(range(5)), data.input_ids)
    evaluator = Evaluator(llama, space, fitness, dense)
    whole = evaluator.outcome(genome, batch)
    parts = [evaluator.partial_outcome(genome, batch.rows(a, b)) for a, b in ((0, 2), (2, 5))]
    assert all(p.count is not None and p.total is not None for p in parts)
    combined = evaluator.combine(parts)
    assert combined.error is None
    assert combined.value == pytest.approx(whole.value, rel=1e-6)
    assert combined.seconds == pytest.approx(sum(p.seconds for p in parts))


def test_a_failed_shard_fails_the_candidate(llama):
    data = token_data(2, 8)
    kl = KLDivergence()
    evaluator = Evaluator(llama, LayerDropSpace(N_LAYERS, num_drop=0), kl)  # not prepared
    genome = LayerDropSpace(N_LAYERS, num_drop=0).from_dropped()
    part = evaluator.partial_outcome(genome, Batch((0, 1), data.input_ids))
    assert part.error is not None and "prepare" in part.error
    combined = evaluator.combine([part])
    assert combined.error == part.error and math.isnan(combined.value)


def test_a_plain_callable_is_not_additive():
    assert not is_additive(lambda model, batch: 0.0)
    assert not is_additive(build_model)


def test_perplexity_partial_reduces_to_the_call(llama):
    data = token_data(3, 8)
    ppl = Perplexity()
    genome = LayerDropSpace(N_LAYERS, num_drop=0).from_dropped()
    candidate = Candidate(llama, genome)
    batch = Batch((0, 1, 2), data.input_ids)
    total, count = ppl.partial(candidate, batch)
    assert count == 3 * 7
    assert ppl.reduce(total, count) == pytest.approx(ppl(candidate, batch))
