"""GGUF input: tiny Qwen2 and Gemma 3 (text) GGUF files written in code (``gguf`` package,
float32 tensors, the llama.cpp names and conventions) load through
:func:`evosearch.models.load_model` as their HF classes, converted once into the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, logits, random_ids

import evosearch.models as models
from evosearch.models import load_model

gguf = pytest.importorskip("gguf")

# HF module name -> llama.cpp tensor name of a block parameter
_BLOCK_TENSORS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
_NORMS = {  # the norms around the sublayers: Gemma has four per block, Qwen2 two
    "qwen2": {"post_attention_layernorm": "ffn_norm"},
    "gemma3": {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _add_tokenizer(writer, arch: str, vocab_size: int) -> None:
    """One token per character: byte-level BPE for Qwen2, sentencepiece for Gemma."""
    if arch == "qwen2":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        spelling = bytes_to_unicode()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list([spelling[b] for b in range(vocab_size)])
        writer.add_token_types([1] * vocab_size)
    else:
        tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + [chr(i) for i in range(4, vocab_size)]
        writer.add_tokenizer_model("llama")
        writer.add_token_list([t if t != " " else "\u2581" for t in tokens])
        writer.add_token_types([3, 3, 3, 2] + [1] * (vocab_size - 4))  # control, unknown, normal
    writer.add_token_scores([0.0] * vocab_size)  # no merges: the reader derives none
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_gguf(model, path, arch: str) -> None:
    """Write ``model`` (Qwen2 or Gemma 3 text) as a float32 GGUF file named as llama.cpp does."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_embedding_length(c.hidden_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if arch == "gemma3":
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_sliding_window(c.sliding_window)
    _add_tokenizer(writer, arch, c.vocab_size)
    names = {**_BLOCK_TENSORS, **_NORMS[arch]}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch == "gemma3" and "norm" in name:
            tensor = tensor + 1  # llama.cpp stores Gemma's norm scale (1 + w)
        if name in _TOP:
            target = _TOP[name]
        else:  # model.layers.{i}.[{self_attn|mlp}.]{module}.{weight|bias}
            parts = name.split(".")
            target = f"blk.{parts[2]}.{names[parts[-2]]}.{parts[-1]}"
        writer.add_tensor(target, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# GGUF carries no layer_types or query_pre_attn_scalar: the tiny Gemma uses transformers'
# defaults (every sixth layer full attention, scalar 256), as real Gemma 3 checkpoints do.
_MODELS = {
    "qwen2": lambda: build_model("qwen2"),
    "gemma3": lambda: build_model(
        "gemma3_text", n_layers=6, layer_types=None, query_pre_attn_scalar=256
    ),
}


@pytest.mark.parametrize(("arch", "cls"), [("qwen2", "Qwen2"), ("gemma3", "Gemma3")])
def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch, arch, cls):
    monkeypatch.setenv("EVOSEARCH_CACHE", str(tmp_path / "cache"))
    dense = _MODELS[arch]()
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(dense, path, arch)
    ids = random_ids(2, 10)
    model, tokenizer = load_model(str(path))
    assert type(model).__name__ == f"{cls}ForCausalLM"
    torch.testing.assert_close(logits(model, ids), logits(dense, ids))
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [ord("a"), ord("b")]
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    assert (cached / "config.json").is_file() and (cached / "tokenizer.json").is_file()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_load_gguf", no_second_conversion)
    again, _ = load_model(str(path))
    torch.testing.assert_close(logits(again, ids), logits(dense, ids))
