"""GGUF input: a tiny GGUF file written in code (``gguf`` package, float32 tensors, byte-level
vocabulary) loads through :func:`evosearch.models.load_model`, converted once into the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, logits, random_ids

import evosearch.models as models
from evosearch.models import load_model

gguf = pytest.importorskip("gguf")

# HF module name -> llama.cpp tensor name, for Qwen2's block parameters
_QWEN2_TENSORS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_qwen2_gguf(model, path) -> None:
    """Write ``model`` (a Qwen2ForCausalLM) as a float32 GGUF file, the way llama.cpp names it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_embedding_length(c.hidden_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    spelling = bytes_to_unicode()  # byte-level BPE: one token per byte, no merges
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([spelling[b] for b in range(c.vocab_size)])
    writer.add_token_types([1] * c.vocab_size)
    writer.add_token_scores([0.0] * c.vocab_size)  # no merges: the reader derives none
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    for name, tensor in model.state_dict().items():
        if name in _TOP:
            target = _TOP[name]
        else:  # model.layers.{i}.{self_attn|mlp|...}.{module}.{weight|bias}
            parts = name.split(".")
            target = f"blk.{parts[2]}.{_QWEN2_TENSORS[parts[-2]]}.{parts[-1]}"
        writer.add_tensor(target, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOSEARCH_CACHE", str(tmp_path / "cache"))
    dense = build_model("qwen2")
    path = tmp_path / "tiny-qwen2.gguf"
    write_qwen2_gguf(dense, path)
    ids = random_ids(2, 10)
    model, tokenizer = load_model(str(path))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    torch.testing.assert_close(logits(model, ids), logits(dense, ids))
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [ord("a"), ord("b")]
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    assert (cached / "config.json").is_file() and (cached / "tokenizer.json").is_file()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_load_gguf", no_second_conversion)
    again, _ = load_model(str(path))
    torch.testing.assert_close(logits(again, ids), logits(dense, ids))
