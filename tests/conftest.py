"""Shared helpers: tiny random causal LMs built in code, offline tokenizers, toy token data.

Every model here is a few kilobytes: 4 blocks, hidden size 32, vocabulary 128. Parameters are
perturbed after initialisation so that biases and norm weights are not their trivial defaults
(zero / one); a bug that ignores a bias or a norm would otherwise go unnoticed.
"""

from __future__ import annotations

import pytest
import torch
from helpers import search_args
from torch import nn

from evosearch.data import TokenData

ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2")
# The families of issue 22, tested by tests/test_families.py (kept out of ARCHS so that every
# parametrized test does not run four more times): four norms per block and sliding/full
# attention layers (Gemma 2/3), query/key norms (Gemma 3, Qwen3), scaled and tied embeddings
# (Gemma), fused qkv_proj and gate_up_proj (Phi-3).
FAMILIES = ("gemma2", "gemma3_text", "phi3", "qwen3")
VOCAB = 128
HIDDEN = 32
N_LAYERS = 4
BOS, EOS = 1, 2

# Tiny models gain nothing from intra-op threads; one thread avoids oversubscribing small CI
# machines.
torch.set_num_threads(1)

# Where each architecture keeps the output projection of a block's attention and of its MLP.
# Written out here, independently of evosearch.arch, to build reference models by hand.
OUT_PROJ = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "opt": ("self_attn.out_proj", "fc2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    **{family: ("self_attn.o_proj", "mlp.down_proj") for family in FAMILIES},
}


def _layer_types(n_layers: int) -> list[str]:
    """Alternating sliding-window and full attention, so a block drop has to keep them right."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


def _family_config(arch: str, n_layers: int, llama_like: dict, overrides: dict):
    from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

    if arch in ("gemma2", "gemma3_text"):
        cls = Gemma2Config if arch == "gemma2" else Gemma3TextConfig
        extra = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, pad_token_id=0)
        extra["layer_types"] = _layer_types(n_layers)
        return cls(**{**llama_like, **extra, **overrides})
    if arch == "qwen3":
        extra = dict(head_dim=8, use_sliding_window=True, sliding_window=4)
        extra["layer_types"] = _layer_types(n_layers)
        return Qwen3Config(**{**llama_like, **extra, **overrides})
    if arch == "phi3":
        return Phi3Config(**{**llama_like, "pad_token_id": 0, **overrides})
    raise ValueError(f"no tiny config for {arch!r}")


def _config(arch: str, n_layers: int, **overrides):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    if arch == "llama":
        return LlamaConfig(**{**llama_like, **overrides})
    if arch == "mistral":
        return MistralConfig(**{**llama_like, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**llama_like, **overrides})
    if arch == "opt":
        return OPTConfig(
            **{
                "vocab_size": VOCAB,
                "hidden_size": HIDDEN,
                "ffn_dim": 2 * HIDDEN,
                "num_hidden_layers": n_layers,
                "num_attention_heads": 4,
                "word_embed_proj_dim": HIDDEN,
                "max_position_embeddings": 64,
                "bos_token_id": BOS,
                "eos_token_id": EOS,
                "pad_token_id": 0,
                **overrides,
            }
        )
    if arch in FAMILIES:
        return _family_config(arch, n_layers, llama_like, overrides)
    if arch == "gpt2":
        return GPT2Config(
            **{
                "vocab_size": VOCAB,
                "n_embd": HIDDEN,
                "n_layer": n_layers,
                "n_head": 4,
                "n_positions": 64,
                "bos_token_id": BOS,
                "eos_token_id": EOS,
                **overrides,
            }
        )
    raise ValueError(f"no tiny config for {arch!r}")


def build_model(arch: str, *, n_layers: int = N_LAYERS, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random causal LM of ``arch`` in eval mode, deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, n_layers, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial biases and norm weights
    return model.eval().requires_grad_(False)


def random_ids(n: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """``(n, seq_len)`` random token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=generator)


def token_data(n: int = 8, seq_len: int = 8, *, seed: int = 0) -> TokenData:
    return TokenData(random_ids(n, seq_len, seed=seed), "random test tokens")


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


class CharTokenizer:
    """The slice of the tokenizer interface :func:`evosearch.data.load_token_data` uses: one
    token per character, ``ord(c) % 128``."""

    bos_token_id = BOS
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def hf_tokenizer():
    """A real, saveable character-level ``PreTrainedTokenizerFast`` built without the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {(chr(i) if i >= 32 else f"<{i}>"): i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<1>", eos_token="<2>", unk_token="<0>"
    )


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch):
    return build_model(arch)


@pytest.fixture
def llama():
    return build_model("llama")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished ``evosearch search`` run (with baselines and perplexity) on a 6-block random
    Llama, made through the CLI: the run directory, with its ``report.html`` already written."""
    from evosearch.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    model_dir = root / "tiny"
    build_model("llama", n_layers=6, max_position_embeddings=256).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    text = root / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = root / "run"
    argv = [
        *search_args(model_dir, text, out),
        "--baselines",
        "shortgpt,angular,last",
        "--eval-ppl",
        str(text),
        "--eval-seq-len",
        "32",
        "--eval-windows",
        "2",
    ]
    assert main(argv) == 0
    return out
