"""Small random-weight GGUF models in the shapes of the architectures people run, written with `gguf`.

A few MB each, generated in seconds: the attention shapes (query and KV heads, head dimension, QK-norm,
biases, fused projections, sliding windows) are the real models', the widths that only cost bytes
(embedding, feed-forward, vocabulary) are small. Used by the tests to prove the compressed cache on every
shape, and by anything that needs a model of a given shape without downloading one.

The vocabulary is byte-level BPE (GPT-2's byte alphabet, a few merges) with ChatML's special tokens and a
ChatML template, so tokenizing, detokenizing and chat rendering work as for a real model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import LocalkvError


@dataclass(frozen=True)
class Shape:
    arch: str                 # llama.cpp's architecture name (general.architecture)
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_embd: int               # the residual width (small: it only costs bytes)
    n_ff: int = 256
    rope_base: float = 10000.0
    qk_norm: bool = False     # Qwen3, Gemma 3: RMS norm on each head's q and k
    qkv_bias: bool = False    # Qwen2
    fused_qkv: bool = False   # Phi-3: one attn_qkv projection, one ffn_up for gate and up
    sliding_window: int = 0   # Gemma 3: windowed layers (every `swa_pattern`-th layer is global)
    swa_pattern: int = 6
    rope_sections: tuple[int, ...] = ()  # multi-position RoPE (Qwen2-VL)
    notes: str = ""
    extra: dict = field(default_factory=dict)


# The attention shapes of the models people run (per layer: a few layers are enough). Qwen2 and Phi-3 tie the
# residual width to the query heads (n_embd = n_head x head_dim); the others do not, so theirs is small.
SHAPES: dict[str, Shape] = {
    "llama": Shape("llama", 4, 32, 8, 128, 64, rope_base=500000.0, notes="Llama 3.x 8B: 32 query / 8 KV heads, dim 128"),
    "mistral": Shape("llama", 4, 32, 8, 128, 64, rope_base=1000000.0,
                     notes="Mistral 7B v0.3 (llama architecture): 32 / 8 heads, dim 128"),
    "qwen2": Shape("qwen2", 3, 14, 2, 64, 896, rope_base=1000000.0, qkv_bias=True,
                   notes="Qwen2.5 0.5B: 14 / 2 heads, dim 64, q/k/v biases"),
    "qwen3": Shape("qwen3", 4, 32, 8, 128, 64, rope_base=1000000.0, qk_norm=True,
                   notes="Qwen3 8B: 32 / 8 heads, dim 128, QK-norm"),
    "phi3": Shape("phi3", 4, 4, 4, 96, 384, fused_qkv=True,
                  notes="Phi-3 mini: as many KV heads as query heads (4 of its 32 here), dim 96, fused qkv"),
    "gemma3": Shape("gemma3", 6, 4, 1, 256, 128, rope_base=1000000.0, qk_norm=True, sliding_window=128,
                    notes="Gemma 3 270M: 4 / 1 heads, dim 256, QK-norm, 5 windowed layers to 1 global"),
    "gpt-oss": Shape("gpt-oss", 4, 64, 8, 64, 64, rope_base=150000.0, sliding_window=128, swa_pattern=2,
                     extra={"experts": 4, "experts_used": 2},
                     notes="gpt-oss 20B: 64 / 8 heads, dim 64, attention sinks, mixture of experts, every other "
                           "layer windowed"),
    "mamba": Shape("mamba", 2, 0, 0, 0, 64, extra={"d_inner": 128, "d_state": 16, "d_conv": 4, "dt_rank": 4},
                   notes="Mamba: recurrent state, no KV cache (hybrid models hold their attention beside such state)"),
    "qwen2vl": Shape("qwen2vl", 2, 14, 2, 64, 896, rope_base=1000000.0, qkv_bias=True, rope_sections=(16, 8, 8, 0),
                     notes="Qwen2-VL: multi-position RoPE"),
}

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "i n", "Ġt he", "e r", "a n", "o n", "Ġ a", "r e", "e s")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for every byte, in byte order (what byte-level BPE vocabularies hold)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): the bytes, the merged pieces, then ChatML's special tokens."""
    tokens = _byte_alphabet()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    types = [1] * len(tokens)  # normal
    tokens += list(SPECIAL)
    types += [3] * len(SPECIAL)  # control
    return tokens, types, list(MERGES)


def write_random_model(path: str | os.PathLike, shape: Shape | str, seed: int = 0, scale: float = 1.5,
                       chat_template: bool = True) -> Path:
    """Write a GGUF of `shape` (a Shape or a name in SHAPES) with random f16 weights; returns the path.
    Without `chat_template` it is a base model (no tokenizer.chat_template).

    `scale` sets the q/k projections' spread (in units of 1/sqrt(n_embd)): above 1 attention is peaked
    enough that a policy's scores tell tokens apart.
    """
    import gguf
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise LocalkvError(f"unknown model shape '{shape}': choose one of {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    rng = np.random.default_rng(seed)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tokens, types, merges = vocabulary()
    n_vocab = len(tokens)
    s = shape
    w = gguf.GGUFWriter(str(tmp), s.arch)
    w.add_block_count(s.n_layer)
    w.add_context_length(32768)
    w.add_embedding_length(s.n_embd)
    w.add_layer_norm_rms_eps(1e-6)
    if s.arch != "mamba":
        w.add_feed_forward_length(s.n_ff)
        w.add_head_count(s.n_head)
        w.add_head_count_kv(s.n_head_kv)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_rope_dimension_count(s.head_dim)
        w.add_rope_freq_base(s.rope_base)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    moe = s.arch == "gpt-oss"
    if moe:
        w.add_expert_count(s.extra["experts"])
        w.add_expert_used_count(s.extra["experts_used"])
        w.add_expert_feed_forward_length(s.n_ff)
    if s.rope_sections:
        w.add_rope_dimension_sections(list(s.rope_sections))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(CHATML)

    def mat(rows: int, cols: int, std: float) -> np.ndarray:  # a {cols, rows} ggml tensor: numpy [rows, cols]
        return (rng.standard_normal((rows, cols)) * std).astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    unit = 1.0 / np.sqrt(s.n_embd)
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    w.add_tensor("token_embd.weight", mat(n_vocab, s.n_embd, 1.0))
    w.add_tensor("output_norm.weight", norm(s.n_embd))
    w.add_tensor("output.weight", mat(n_vocab, s.n_embd, unit))
    if s.arch == "mamba":
        _add_mamba_layers(w, s, mat, norm)
    for i in range(s.n_layer if s.arch != "mamba" else 0):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm(s.n_embd))
        if s.fused_qkv:
            w.add_tensor(b + "attn_qkv.weight", np.concatenate(
                [mat(q_dim, s.n_embd, scale * unit), mat(kv_dim, s.n_embd, scale * unit), mat(kv_dim, s.n_embd, unit)]))
        else:
            w.add_tensor(b + "attn_q.weight", mat(q_dim, s.n_embd, scale * unit))
            w.add_tensor(b + "attn_k.weight", mat(kv_dim, s.n_embd, scale * unit))
            w.add_tensor(b + "attn_v.weight", mat(kv_dim, s.n_embd, unit))
        if s.qkv_bias:
            for name, n in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                w.add_tensor(b + name + ".bias", (0.1 * rng.standard_normal(n)).astype(np.float32))
        if s.qk_norm:
            w.add_tensor(b + "attn_q_norm.weight", norm(s.head_dim))
            w.add_tensor(b + "attn_k_norm.weight", norm(s.head_dim))
        w.add_tensor(b + "attn_output.weight", mat(s.n_embd, q_dim, 1.0 / np.sqrt(q_dim)))
        if moe:  # gpt-oss: biases on the output and every expert, learned attention sinks, experts for the FFN
            e, f = s.extra["experts"], s.n_ff
            w.add_tensor(b + "attn_output.bias", (0.1 * rng.standard_normal(s.n_embd)).astype(np.float32))
            w.add_tensor(b + "attn_sinks.weight", rng.standard_normal(s.n_head).astype(np.float32))
            w.add_tensor(b + "post_attention_norm.weight", norm(s.n_embd))
            w.add_tensor(b + "ffn_gate_inp.weight", mat(e, s.n_embd, unit).astype(np.float32))
            w.add_tensor(b + "ffn_gate_inp.bias", np.zeros(e, dtype=np.float32))
            for name, shape3 in (("ffn_gate_exps", (e, f, s.n_embd)), ("ffn_up_exps", (e, f, s.n_embd)),
                                 ("ffn_down_exps", (e, s.n_embd, f))):
                w.add_tensor(b + name + ".weight",
                             (rng.standard_normal(shape3) / np.sqrt(shape3[2])).astype(np.float16))
                w.add_tensor(b + name + ".bias", np.zeros(shape3[:2], dtype=np.float32))
            continue
        if s.arch == "gemma3":
            w.add_tensor(b + "post_attention_norm.weight", norm(s.n_embd))
            w.add_tensor(b + "post_ffw_norm.weight", norm(s.n_embd))
        w.add_tensor(b + "ffn_norm.weight", norm(s.n_embd))
        if s.fused_qkv:
            w.add_tensor(b + "ffn_up.weight", mat(2 * s.n_ff, s.n_embd, unit))
        else:
            w.add_tensor(b + "ffn_gate.weight", mat(s.n_ff, s.n_embd, unit))
            w.add_tensor(b + "ffn_up.weight", mat(s.n_ff, s.n_embd, unit))
        w.add_tensor(b + "ffn_down.weight", mat(s.n_embd, s.n_ff, 1.0 / np.sqrt(s.n_ff)))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)  # never a half-written model under the final name
    return path


def _add_mamba_layers(w, s: Shape, mat, norm) -> None:
    """A Mamba block per layer: recurrent state instead of a KV cache."""
    x = s.extra
    d_inner, d_state, d_conv, dt_rank = x["d_inner"], x["d_state"], x["d_conv"], x["dt_rank"]
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)
    for i in range(s.n_layer):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm(s.n_embd))
        w.add_tensor(b + "ssm_in.weight", mat(2 * d_inner, s.n_embd, 0.1))
        w.add_tensor(b + "ssm_conv1d.weight", mat(d_inner, d_conv, 0.1).astype(np.float32))
        w.add_tensor(b + "ssm_conv1d.bias", np.zeros(d_inner, dtype=np.float32))
        w.add_tensor(b + "ssm_x.weight", mat(dt_rank + 2 * d_state, d_inner, 0.1))
        w.add_tensor(b + "ssm_dt.weight", mat(d_inner, dt_rank, 0.1).astype(np.float32))
        w.add_tensor(b + "ssm_dt.bias", np.zeros(d_inner, dtype=np.float32))
        w.add_tensor(b + "ssm_a", -np.ones((d_inner, d_state), dtype=np.float32))
        w.add_tensor(b + "ssm_d", np.ones(d_inner, dtype=np.float32))
        w.add_tensor(b + "ssm_out.weight", mat(s.n_embd, d_inner, 0.1))


def shape_with(name: str, **changes) -> Shape:
    """A shape of SHAPES with some fields changed (more layers, another window)."""
    if name not in SHAPES:
        raise LocalkvError(f"unknown model shape '{name}': choose one of {', '.join(SHAPES)}")
    return replace(SHAPES[name], **changes)
