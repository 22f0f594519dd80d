"""Mapping between megatron-core global checkpoint tensors and HuggingFace state dicts.

Two HuggingFace architectures, both directions, as pure functions on whole (global) tensors:

* ``GPT2LMHeadModel``  LayerNorm, GeLU MLP, learned absolute positions, biases, (un)tied head;
* ``LlamaForCausalLM`` RMSNorm, SwiGLU MLP, RoPE (rotate-half), GQA, optional biases, (un)tied head;
* ``Qwen2ForCausalLM`` the same with biases on q/k/v only (megatron's ``--add-qkv-bias``);
* ``Qwen3ForCausalLM`` Llama's layout without biases, with per-head q/k RMSNorms (``--qk-layernorm``).

Layout facts the mapping relies on (megatron-core 0.16, TE-style checkpoint names):

* Layers are stacked: ``decoder.layers.<param>`` has shape [L, ...]; layer ``l`` is ``t[l]``.
* The fused QKV weight [G*(H/G+2)*d, h] is ordered per query group g:
  ``[q rows of the H/G heads of g (H/G*d rows); k_g (d rows); v_g (d rows)]`` (H heads, G groups,
  head size d). HF keeps q [H*d, h], k [G*d, h], v [G*d, h]; q head i uses kv head i // (H/G)
  in both (megatron's repeat_interleave, HF's repeat_kv).
* The SwiGLU fc1 weight [2f, h] is ``[gate; up]``; HF has ``gate_proj`` and ``up_proj``.
* The input norms are stored with the QKV / fc1 linears (``linear_qkv.layer_norm_weight``,
  ``linear_fc1.layer_norm_weight``), as Transformer Engine names them; the local spec's names
  (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``) are accepted too.
* GPT-2 uses ``Conv1D`` layers: weights are stored transposed, [in, out]; ``c_attn`` is [q; k; v].
* Embeddings and the output layer are padded to ``padded_vocab`` rows; HF gets only the first
  ``vocab`` (the tokenizer's) rows, and import pads with zero rows.
* RoPE: megatron's non-interleaved rotary embedding and HF Llama's both rotate halves, so q/k
  rows need no permutation.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from megatron_staged.errors import UserError

# ---- megatron-core names ------------------------------------------------------------------------

LAYERS = "decoder.layers."
WORD_EMB = "embedding.word_embeddings.weight"
POS_EMB = "embedding.position_embeddings.weight"
FINAL_NORM_W = "decoder.final_layernorm.weight"
FINAL_NORM_B = "decoder.final_layernorm.bias"
OUTPUT = "output_layer.weight"

NORM1_W = "self_attention.linear_qkv.layer_norm_weight"
NORM1_B = "self_attention.linear_qkv.layer_norm_bias"
QKV_W = "self_attention.linear_qkv.weight"
QKV_B = "self_attention.linear_qkv.bias"
PROJ_W = "self_attention.linear_proj.weight"
PROJ_B = "self_attention.linear_proj.bias"
NORM2_W = "mlp.linear_fc1.layer_norm_weight"
NORM2_B = "mlp.linear_fc1.layer_norm_bias"
FC1_W = "mlp.linear_fc1.weight"
FC1_B = "mlp.linear_fc1.bias"
FC2_W = "mlp.linear_fc2.weight"
FC2_B = "mlp.linear_fc2.bias"
Q_NORM = "self_attention.q_layernorm.weight"  # --qk-layernorm: RMSNorm over the head size
K_NORM = "self_attention.k_layernorm.weight"

# local-spec names -> the names checkpoints use
ALIASES = {
    "input_layernorm.weight": NORM1_W, "input_layernorm.bias": NORM1_B,
    "pre_mlp_layernorm.weight": NORM2_W, "pre_mlp_layernorm.bias": NORM2_B,
}

GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"
QWEN2 = "Qwen2ForCausalLM"  # Llama's layout with q/k/v biases only
QWEN3 = "Qwen3ForCausalLM"  # Llama's layout with per-head q/k norms
# GPT-2 activation_function values (transformers' ACT2FN) megatron computes exactly (erf GeLU; relu2 is
# --squared-relu) and the tanh-approximated GeLUs imported as exact GeLU with a note (~1e-3 apart)
GPT2_EXACT_ACTS = ("gelu", "gelu_python", "relu2")
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")
# Llama 3.1's RoPE scaling as megatron-core's RotaryEmbedding applies it (only the factor varies)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def canonical_layer_param(name: str) -> str:
    """The checkpoint name of a per-layer parameter (maps local-spec norm names)."""
    return ALIASES.get(name, name)


def split_layer_key(key: str) -> Optional[str]:
    """``decoder.layers.<param>`` -> canonical ``<param>``; None for non-layer keys."""
    if not key.startswith(LAYERS):
        return None
    rest = key[len(LAYERS):]
    head, _, tail = rest.partition(".")
    if head.isdigit():  # per-layer keys (non-homogeneous layers): decoder.layers.<i>.<param>
        rest = tail
    return canonical_layer_param(rest)


# ---- architecture ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """What the mapping needs to know about a model (sizes are global)."""

    hf_class: str          # GPT2, LLAMA, QWEN2 or QWEN3
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int            # query groups (== heads without GQA)
    head_dim: int
    vocab: int             # true (tokenizer) vocabulary: rows exported to HF
    padded_vocab: int      # rows in the megatron checkpoint
    max_positions: int
    norm_eps: float
    rotary_base: float
    bias: bool             # linear layers have biases
    tied: bool             # output layer shares the word embeddings
    qkv_bias: bool = False  # only the QKV projection has a bias (megatron's --add-qkv-bias; Qwen2)
    qk_norm: bool = False   # per-head q/k RMSNorms (megatron's --qk-layernorm; Qwen3)
    rope_scaling_factor: Optional[float] = None  # Llama 3.1's RoPE scaling (--use-rope-scaling), else None
    rotary_interleaved: bool = False  # megatron's --rotary-interleaved: q/k channels permuted per head on export
    squared_relu: bool = False  # GPT-2 MLP with relu(x)^2 (megatron's --squared-relu; transformers' "relu2")

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias or self.qkv_bias

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


def arch_from_model_config(m, vocab: int) -> Arch:
    """The HF architecture a (resolved) ``ModelConfig`` maps onto; UserError if none does."""
    norm, pos, glu = m.normalization, m.position_embedding_type, bool(m.swiglu)
    relu2 = bool(getattr(m, "squared_relu", False))
    if relu2 and not (norm == "LayerNorm" and pos == "learned_absolute"):
        raise UserError(f"--squared-relu with {norm} and {pos} position embeddings has no transformers architecture "
                        f"(only GPT2LMHeadModel, LayerNorm and learned positions, takes activation_function relu2; "
                        f"Llama-style MLPs are gated)")
    if norm == "LayerNorm" and pos == "learned_absolute" and not glu:
        hf_class = GPT2
        if m.qk_layernorm:
            raise UserError("GPT2LMHeadModel has no query/key norms; a --qk-layernorm checkpoint of the gpt2 family "
                            "cannot be exported")
        if m.num_query_groups != m.num_attention_heads or m.kv_channels * m.num_attention_heads != m.hidden_size:
            raise UserError(
                f"GPT2LMHeadModel needs plain multi-head attention with head size hidden/heads; this "
                f"checkpoint has {m.num_query_groups} query groups for {m.num_attention_heads} heads and "
                f"head size {m.kv_channels} (hidden {m.hidden_size}), which transformers' GPT-2 cannot hold")
    elif norm == "RMSNorm" and pos == "rope" and glu:
        hf_class = QWEN2 if (m.add_qkv_bias and m.disable_bias_linear) else LLAMA
        if m.qk_layernorm:
            if not m.disable_bias_linear or m.add_qkv_bias:
                raise UserError("--qk-layernorm with linear biases has no transformers architecture (Qwen3, the "
                                "one with q/k norms, has no biases)")
            hf_class = QWEN3
        if getattr(m, "rotary_percent", 1.0) != 1.0:
            raise UserError(f"this checkpoint rotates {m.rotary_percent:g} of each head's channels (--rotary-percent); "
                            f"transformers' {hf_class} rotates all of them, so the export would compute "
                            f"another function")
    else:
        raise UserError(
            f"no HuggingFace architecture matches this checkpoint (normalization {norm}, position "
            f"embeddings {pos}, swiglu {glu}); export-hf supports the gpt2 family (LayerNorm, "
            f"learned_absolute, GeLU) -> GPT2LMHeadModel and the llama family (RMSNorm, rope, "
            f"SwiGLU) -> LlamaForCausalLM (Qwen2ForCausalLM with --add-qkv-bias, Qwen3ForCausalLM with "
            f"--qk-layernorm)")
    if not 0 < vocab <= m.padded_vocab_size:
        raise UserError(f"vocabulary size {vocab} must be in 1..{m.padded_vocab_size} (the checkpoint's "
                        f"padded vocabulary); pass the tokenizer's size with --vocab-size")
    return Arch(hf_class=hf_class, num_layers=m.num_layers, hidden=m.hidden_size, ffn=m.ffn_hidden_size,
                heads=m.num_attention_heads, groups=m.num_query_groups, head_dim=m.kv_channels,
                vocab=vocab, padded_vocab=m.padded_vocab_size, max_positions=m.max_position_embeddings,
                norm_eps=m.norm_epsilon, rotary_base=m.rotary_base, bias=not m.disable_bias_linear,
                tied=not m.untie_embeddings_and_output_weights,
                qkv_bias=bool(m.add_qkv_bias) and bool(m.disable_bias_linear), qk_norm=bool(m.qk_layernorm),
                rope_scaling_factor=float(m.rope_scaling_factor) if m.use_rope_scaling else None,
                squared_relu=relu2,
                rotary_interleaved=pos == "rope" and bool(getattr(m, "rotary_interleaved", False)))


def arch_to_model_fields(a: Arch) -> dict:
    """``ModelConfig`` fields (``Config.from_dict({'model': ...})``) for an imported architecture."""
    gpt2 = a.hf_class == GPT2
    return {
        "model_family": "gpt2" if gpt2 else "llama",
        "num_layers": a.num_layers, "hidden_size": a.hidden, "ffn_hidden_size": a.ffn,
        "num_attention_heads": a.heads, "kv_channels": a.head_dim,
        "group_query_attention": a.groups != a.heads, "num_query_groups": a.groups,
        "max_position_embeddings": a.max_positions,
        "position_embedding_type": "learned_absolute" if gpt2 else "rope",
        "rotary_base": int(a.rotary_base), "swiglu": not gpt2, "squared_relu": a.squared_relu,
        "normalization": "LayerNorm" if gpt2 else "RMSNorm", "norm_epsilon": a.norm_eps,
        "untie_embeddings_and_output_weights": not a.tied, "disable_bias_linear": not a.bias,
        "add_qkv_bias": a.qkv_bias, "qk_layernorm": a.qk_norm, "padded_vocab_size": a.padded_vocab,
        "use_rope_scaling": a.rope_scaling_factor is not None, "rope_scaling_factor": a.rope_scaling_factor or 8.0,
    }


def hf_config_dict(a: Arch, **extra) -> dict:
    """Keyword arguments for ``GPT2Config`` / ``LlamaConfig`` / ``Qwen2Config`` (dropout 0: megatron's
    defaults here)."""
    if a.hf_class == GPT2:
        d = dict(model_type="gpt2", vocab_size=a.vocab, n_positions=a.max_positions, n_embd=a.hidden,
                 n_layer=a.num_layers, n_head=a.heads, n_inner=a.ffn,
                 # megatron uses exact (erf) GeLU, not HF's default gelu_new; relu2 is relu(x)^2 (--squared-relu)
                 activation_function="relu2" if a.squared_relu else "gelu",
                 layer_norm_epsilon=a.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                 tie_word_embeddings=a.tied)
    else:
        d = dict(model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                 num_hidden_layers=a.num_layers, num_attention_heads=a.heads, num_key_value_heads=a.groups,
                 head_dim=a.head_dim, max_position_embeddings=a.max_positions, rms_norm_eps=a.norm_eps,
                 rope_theta=float(a.rotary_base), hidden_act="silu", attention_bias=a.bias, mlp_bias=a.bias,
                 attention_dropout=0.0, tie_word_embeddings=a.tied)
        if a.rope_scaling_factor is not None:  # megatron-core's Llama 3.1 scaling: these constants are fixed
            d["rope_parameters"] = dict(LLAMA3_ROPE, rope_type="llama3", factor=a.rope_scaling_factor,
                                        rope_theta=float(a.rotary_base))
        if a.hf_class == QWEN2:  # q/k/v biases are built in; no sliding window
            for k in ("attention_bias", "mlp_bias"):
                del d[k]
            d.update(model_type="qwen2", use_sliding_window=False)
        elif a.hf_class == QWEN3:  # q/k norms are built in; no biases, no sliding window
            del d["mlp_bias"]
            d.update(model_type="qwen3", attention_bias=False, use_sliding_window=False)
    d["architectures"] = [a.hf_class]
    d["megatron_padded_vocab_size"] = a.padded_vocab
    d.update(extra)
    return d


def arch_from_hf_config(c: dict, padded_vocab: Optional[int] = None) -> Arch:
    """The architecture of a HF ``config.json`` (GPT-2, Llama, Qwen2 or Qwen3); UserError for anything else."""
    mt = c.get("model_type")
    archs = c.get("architectures") or []
    if mt in ("gpt2", "llama", "qwen2", "qwen3") and isinstance(archs, list) and archs and not any(
            isinstance(n, str) and (n.endswith("ForCausalLM") or n.endswith("LMHeadModel") or n == "GPT2Model")
            for n in archs):
        raise UserError(f"config.json's architectures {archs} is not a causal language model; import-hf reads "
                        f"GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (another head, "
                        f"such as a classifier's, would be dropped and the output layer taken from elsewhere)")
    if mt in ("gpt2", "llama", "qwen2", "qwen3"):
        _check_config_types(c)
    if mt == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in (*GPT2_EXACT_ACTS, *GPT2_TANH_GELUS):
            raise UserError(f"GPT-2 activation_function {act!r} is neither a GeLU nor relu2 (--squared-relu); "
                            f"megatron_staged's gpt2 family has no other")
        if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
            raise UserError("GPT-2 configs with scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true "
                            "have no megatron equivalent")
        h, heads = c["n_embd"], c["n_head"]
        return _checked_arch(GPT2, c, num_layers=c["n_layer"], hidden=h, ffn=c.get("n_inner") or 4 * h,
                             heads=heads, groups=heads, head_dim=h // heads, vocab=c["vocab_size"],
                             padded_vocab=padded_vocab, max_positions=c["n_positions"],
                             norm_eps=c.get("layer_norm_epsilon", 1e-5), rotary_base=10000, bias=True,
                             tied=c.get("tie_word_embeddings", True), squared_relu=act == "relu2")
    if mt in ("llama", "qwen2", "qwen3"):
        if mt != "llama" and c.get("use_sliding_window", False):
            raise UserError(f"{mt} with use_sliding_window=true has no megatron equivalent here (attention is "
                            f"causal over the whole sequence)")
        if mt == "qwen3" and c.get("attention_bias", False):
            raise UserError("Qwen3 with attention_bias=true has no megatron equivalent (biases on q/k/v/o but "
                            "not the MLP)")
        if c.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' ACT2FN: the same nn.SiLU
            raise UserError(f"{mt} hidden_act {c.get('hidden_act')!r} is not silu; megatron's SwiGLU uses silu")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            fixed = {k: rope.get(k) for k in LLAMA3_ROPE}
            if any(v is None or float(v) != LLAMA3_ROPE[k] for k, v in fixed.items()):
                raise UserError(f"llama3 RoPE scaling with {fixed}: megatron-core's fixes "
                                f"{LLAMA3_ROPE} (only the factor is a flag)")
            scaling = float(rope["factor"])
        elif rope_type != "default":
            raise UserError(f"RoPE scaling {rope_type!r} is not supported (the default rotary embedding, or "
                            f"Llama 3.1's 'llama3' scaling)")
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        if float(theta) != int(theta):
            raise UserError(f"rope_theta {theta} is not an integer; --rotary-base takes integers")
        if mt == "llama" and bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
            raise UserError("attention_bias and mlp_bias differ; megatron has one switch for all linear biases "
                            "(and --add-qkv-bias for q/k/v alone, which is Qwen2's layout)")
        h, heads = c["hidden_size"], c["num_attention_heads"]
        return _checked_arch({"qwen2": QWEN2, "qwen3": QWEN3}.get(mt, LLAMA), c, num_layers=c["num_hidden_layers"], hidden=h, ffn=c["intermediate_size"],
                             heads=heads, groups=c.get("num_key_value_heads") or heads,
                             head_dim=c.get("head_dim") or h // heads, vocab=c["vocab_size"],
                             padded_vocab=padded_vocab, max_positions=c.get("max_position_embeddings", 2048),
                             norm_eps=c.get("rms_norm_eps", 1e-6), rotary_base=int(theta),
                             bias=mt == "llama" and bool(c.get("attention_bias", False)),
                             tied=c.get("tie_word_embeddings", False), qkv_bias=mt == "qwen2",
                             qk_norm=mt == "qwen3", rope_scaling_factor=scaling)
    raise UserError(f"config.json has model_type {mt!r}; import-hf reads gpt2, llama, qwen2 and qwen3 models")


# config.json fields read as sizes (0 allowed only for the layer count) and as switches
_INT_FIELDS = ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "num_hidden_layers", "hidden_size",
               "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
               "max_position_embeddings")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx")
_FLOAT_FIELDS = ("layer_norm_epsilon", "rms_norm_eps", "rope_theta")


def _check_config_types(c: dict) -> None:
    """UserError (one line, naming the field) for a config.json value transformers would not accept
    either: a size that is not a positive integer, a switch that is not true/false, a non-number eps.
    A present field is never replaced by a default (``head_dim: 0`` is not 'hidden / heads')."""
    for k in _INT_FIELDS:
        if k in c and not (c[k] is None and k in ("n_inner", "num_key_value_heads", "head_dim")):
            v = c[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k in ("n_layer", "num_hidden_layers") else 1):
                raise UserError(f"config.json {k} is {json.dumps(v)}; expected a {'non-negative' if 'layer' in k else 'positive'} "
                                f"integer")
    for k in _BOOL_FIELDS:
        if k in c and not isinstance(c[k], bool):
            raise UserError(f"config.json {k} is {json.dumps(c[k])}; expected true or false")
    for k in _FLOAT_FIELDS:
        if k in c and c[k] is not None and (isinstance(c[k], bool) or not isinstance(c[k], (int, float)) or c[k] <= 0):
            raise UserError(f"config.json {k} is {json.dumps(c[k])}; expected a positive number")


def _checked_arch(hf_class: str, c: dict, **kw) -> Arch:
    if kw["padded_vocab"] is None:
        kw["padded_vocab"] = kw["vocab"]
    if kw["heads"] % kw["groups"]:
        raise UserError(f"{kw['heads']} attention heads are not divisible by {kw['groups']} key/value heads")
    return Arch(hf_class=hf_class, **kw)


# ---- the maths: fused QKV, SwiGLU fc1, Conv1D, vocabulary padding -------------------------------

def qkv_to_hf(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Megatron fused QKV [G*(H/G+2)*d, *rest] -> (q [H*d, *rest], k [G*d, *rest], v [G*d, *rest]).

    Works for the weight (rest = [h]) and the bias (rest = []).
    """
    per = heads // groups
    rest = tuple(qkv.shape[1:])
    w = qkv.reshape(groups, per + 2, head_dim, *rest)       # per group: per q heads, then k, then v
    q = w[:, :per].reshape(heads * head_dim, *rest)
    k = w[:, per].reshape(groups * head_dim, *rest)
    v = w[:, per + 1].reshape(groups * head_dim, *rest)
    return q, k, v


def hf_to_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """(q [H*d, *rest], k [G*d, *rest], v [G*d, *rest]) -> megatron fused QKV [G*(H/G+2)*d, *rest]."""
    per = heads // groups
    rest = tuple(q.shape[1:])
    qg = q.reshape(groups, per, head_dim, *rest)
    kg = k.reshape(groups, 1, head_dim, *rest)
    vg = v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(groups * (per + 2) * head_dim, *rest)


def interleaved_to_half(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of query/key heads [n*d, *rest] from interleaved RoPE order to transformers' half order.

    megatron's ``rotary_interleaved`` rotates channel pairs (2i, 2i+1) of each head by angle i;
    transformers' Llama rotates (i, i + d/2) by the same angle i. Reordering each head's channels as
    [0, 2, ..., d-2, 1, 3, ..., d-1] in both queries and keys maps one onto the other and leaves
    q . k unchanged (the same permutation on both sides of the dot product).
    """
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    rest = tuple(t.shape[1:])
    return t.reshape(-1, head_dim, *rest)[:, perm].reshape(t.shape)


def fc1_to_gate_up(fc1: torch.Tensor, ffn: int):
    """SwiGLU fc1 [2f, *rest] = [gate; up] -> (gate [f, *rest], up [f, *rest])."""
    return fc1[:ffn], fc1[ffn:]


def gate_up_to_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(gate [f, *rest], up [f, *rest]) -> SwiGLU fc1 [2f, *rest]."""
    return torch.cat([gate, up], dim=0)


def linear_to_conv1d(w: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight [out, in] -> HF GPT-2 Conv1D weight [in, out]."""
    return w.t()


def conv1d_to_linear(w: torch.Tensor) -> torch.Tensor:
    """HF GPT-2 Conv1D weight [in, out] -> nn.Linear weight [out, in]."""
    return w.t()


def unpad_vocab(w: torch.Tensor, vocab: int) -> torch.Tensor:
    """[padded_V, h] -> the tokenizer's rows [V, h]."""
    return w[:vocab]


def pad_vocab(w: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[V, h] -> [padded_V, h], the padding rows zero."""
    if w.shape[0] > padded_vocab:
        raise UserError(f"vocabulary {w.shape[0]} exceeds the padded vocabulary {padded_vocab}")
    pad = w.new_zeros((padded_vocab - w.shape[0],) + tuple(w.shape[1:]))
    return torch.cat([w, pad], dim=0)


# ---- one transformer layer ------------------------------------------------------------------------

def hf_layer_prefix(a: Arch, layer: int) -> str:
    return f"transformer.h.{layer}." if a.hf_class == GPT2 else f"model.layers.{layer}."


def _bias(p: dict, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
    """A layer's bias, or zeros [n] when the checkpoint has none (GPT-2 always has biases)."""
    return p[name] if name in p else like.new_zeros(n)


def layer_to_hf(p: dict, a: Arch) -> dict:
    """One layer: megatron params {param name: tensor} -> HF {name after the layer prefix: tensor}."""
    q, k, v = qkv_to_hf(p[QKV_W], a.heads, a.groups, a.head_dim)
    if a.hf_class == GPT2:
        qb, kb, vb = qkv_to_hf(_bias(p, QKV_B, a.qkv_rows, q), a.heads, a.groups, a.head_dim)
        return {
            "ln_1.weight": p[NORM1_W], "ln_1.bias": p[NORM1_B],
            "attn.c_attn.weight": linear_to_conv1d(torch.cat([q, k, v], 0)),
            "attn.c_attn.bias": torch.cat([qb, kb, vb], 0),
            "attn.c_proj.weight": linear_to_conv1d(p[PROJ_W]), "attn.c_proj.bias": _bias(p, PROJ_B, a.hidden, q),
            "ln_2.weight": p[NORM2_W], "ln_2.bias": p[NORM2_B],
            "mlp.c_fc.weight": linear_to_conv1d(p[FC1_W]), "mlp.c_fc.bias": _bias(p, FC1_B, a.ffn, q),
            "mlp.c_proj.weight": linear_to_conv1d(p[FC2_W]), "mlp.c_proj.bias": _bias(p, FC2_B, a.hidden, q),
        }
    if a.rotary_interleaved:
        q, k = interleaved_to_half(q, a.head_dim), interleaved_to_half(k, a.head_dim)
    gate, up = fc1_to_gate_up(p[FC1_W], a.ffn)
    out = {
        "input_layernorm.weight": p[NORM1_W],
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": p[PROJ_W],
        "post_attention_layernorm.weight": p[NORM2_W],
        "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": p[FC2_W],
    }
    if a.has_qkv_bias:
        qb, kb, vb = qkv_to_hf(p[QKV_B], a.heads, a.groups, a.head_dim)
        if a.rotary_interleaved:
            qb, kb = interleaved_to_half(qb, a.head_dim), interleaved_to_half(kb, a.head_dim)
        out.update({"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb})
    if a.qk_norm:
        qn, kn = p[Q_NORM], p[K_NORM]
        if a.rotary_interleaved:  # a norm over the head size commutes with the channel permutation
            qn, kn = interleaved_to_half(qn, a.head_dim), interleaved_to_half(kn, a.head_dim)
        out.update({"self_attn.q_norm.weight": qn, "self_attn.k_norm.weight": kn})
    if a.bias:
        gb, ub = fc1_to_gate_up(p[FC1_B], a.ffn)
        out.update({"self_attn.o_proj.bias": p[PROJ_B], "mlp.gate_proj.bias": gb, "mlp.up_proj.bias": ub,
                    "mlp.down_proj.bias": p[FC2_B]})
    return out


def layer_from_hf(get: Callable[[str], torch.Tensor], a: Arch) -> dict:
    """One layer: HF tensors (``get(name after the layer prefix)``) -> megatron {param name: tensor}."""
    qd, kvd = a.heads * a.head_dim, a.groups * a.head_dim
    if a.hf_class == GPT2:
        q, k, v = conv1d_to_linear(get("attn.c_attn.weight")).split([qd, kvd, kvd], 0)
        qb, kb, vb = get("attn.c_attn.bias").split([qd, kvd, kvd], 0)
        return {
            NORM1_W: get("ln_1.weight"), NORM1_B: get("ln_1.bias"),
            QKV_W: hf_to_qkv(q, k, v, a.heads, a.groups, a.head_dim),
            QKV_B: hf_to_qkv(qb, kb, vb, a.heads, a.groups, a.head_dim),
            PROJ_W: conv1d_to_linear(get("attn.c_proj.weight")), PROJ_B: get("attn.c_proj.bias"),
            NORM2_W: get("ln_2.weight"), NORM2_B: get("ln_2.bias"),
            FC1_W: conv1d_to_linear(get("mlp.c_fc.weight")), FC1_B: get("mlp.c_fc.bias"),
            FC2_W: conv1d_to_linear(get("mlp.c_proj.weight")), FC2_B: get("mlp.c_proj.bias"),
        }
    p = {
        NORM1_W: get("input_layernorm.weight"),
        QKV_W: hf_to_qkv(get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"),
                         get("self_attn.v_proj.weight"), a.heads, a.groups, a.head_dim),
        PROJ_W: get("self_attn.o_proj.weight"),
        NORM2_W: get("post_attention_layernorm.weight"),
        FC1_W: gate_up_to_fc1(get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")),
        FC2_W: get("mlp.down_proj.weight"),
    }
    if a.qk_norm:
        p.update({Q_NORM: get("self_attn.q_norm.weight"), K_NORM: get("self_attn.k_norm.weight")})
    if a.has_qkv_bias:
        p[QKV_B] = hf_to_qkv(get("self_attn.q_proj.bias"), get("self_attn.k_proj.bias"),
                             get("self_attn.v_proj.bias"), a.heads, a.groups, a.head_dim)
    if a.bias:
        p.update({PROJ_B: get("self_attn.o_proj.bias"),
                  FC1_B: gate_up_to_fc1(get("mlp.gate_proj.bias"), get("mlp.up_proj.bias")),
                  FC2_B: get("mlp.down_proj.bias")})
    return p


# ---- embeddings, final norm, output layer ---------------------------------------------------------

def globals_to_hf(t: dict, a: Arch) -> dict:
    """Non-layer megatron tensors -> HF names (vocabulary rows cut to ``a.vocab``)."""
    if a.hf_class == GPT2:
        out = {"transformer.wte.weight": unpad_vocab(t[WORD_EMB], a.vocab),
               "transformer.wpe.weight": t[POS_EMB],
               "transformer.ln_f.weight": t[FINAL_NORM_W], "transformer.ln_f.bias": t[FINAL_NORM_B]}
    else:
        out = {"model.embed_tokens.weight": unpad_vocab(t[WORD_EMB], a.vocab), "model.norm.weight": t[FINAL_NORM_W]}
    if not a.tied:
        out["lm_head.weight"] = unpad_vocab(t[OUTPUT], a.vocab)
    return out


def global_from_hf(key: str, get: Callable[[str], torch.Tensor], a: Arch) -> torch.Tensor:
    """One non-layer megatron tensor from HF tensors (vocabulary padded to ``a.padded_vocab``)."""
    gpt2 = a.hf_class == GPT2
    emb = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    if key == WORD_EMB:
        return pad_vocab(get(emb), a.padded_vocab)
    if key == OUTPUT:
        return pad_vocab(get(emb if a.tied else "lm_head.weight"), a.padded_vocab)
    if key == POS_EMB and gpt2:
        return get("transformer.wpe.weight")
    if key == FINAL_NORM_W:
        return get("transformer.ln_f.weight" if gpt2 else "model.norm.weight")
    if key == FINAL_NORM_B and gpt2:
        return get("transformer.ln_f.bias")
    raise UserError(f"internal: no HF source for megatron tensor {key!r} ({a.hf_class})")


# ---- whole models -----------------------------------------------------------------------------------

def layer_params(t: dict, layer: int) -> dict:
    """Layer ``layer``'s params from global tensors, stacked ``decoder.layers.<p>`` [L, ...] or per-layer."""
    out = {}
    for key, value in t.items():
        name = split_layer_key(key)
        if name is None:
            continue
        idx = key[len(LAYERS):].partition(".")[0]
        if idx.isdigit():
            if int(idx) == layer:
                out[name] = value
        else:
            out[name] = value[layer]
    return out


def megatron_to_hf(t: dict, a: Arch) -> dict:
    """Whole model: megatron global tensors {key: tensor} -> HF state dict (fresh contiguous tensors)."""
    out = globals_to_hf(t, a)
    for layer in range(a.num_layers):
        prefix = hf_layer_prefix(a, layer)
        for name, value in layer_to_hf(layer_params(t, layer), a).items():
            out[prefix + name] = value
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def hf_to_megatron(get: Callable[[str], torch.Tensor], a: Arch) -> dict:
    """Whole model: HF tensors (``get(name)``) -> megatron global tensors, layers stacked [L, ...]."""
    out = {key: global_from_hf(key, get, a) for key in megatron_global_shapes(a) if not key.startswith(LAYERS)}
    layers = [layer_from_hf(lambda name, p=hf_layer_prefix(a, l): get(p + name), a) for l in range(a.num_layers)]
    for name in (layers[0] if layers else {}):
        out[LAYERS + name] = torch.stack([p[name] for p in layers])
    return out


def megatron_global_shapes(a: Arch) -> dict:
    """Global shapes of the megatron checkpoint's model tensors for ``a`` (stacked layers)."""
    L, h, f = a.num_layers, a.hidden, a.ffn
    s = {WORD_EMB: (a.padded_vocab, h), FINAL_NORM_W: (h,)}
    if a.hf_class == GPT2:
        s.update({POS_EMB: (a.max_positions, h), FINAL_NORM_B: (h,)})
    if not a.tied:
        s[OUTPUT] = (a.padded_vocab, h)
    fc1 = f if a.hf_class == GPT2 else 2 * f
    layer = {NORM1_W: (h,), QKV_W: (a.qkv_rows, h), PROJ_W: (h, a.heads * a.head_dim), NORM2_W: (h,),
             FC1_W: (fc1, h), FC2_W: (h, f)}
    if a.hf_class == GPT2:
        layer.update({NORM1_B: (h,), NORM2_B: (h,)})
    if a.bias:
        layer.update({QKV_B: (a.qkv_rows,), PROJ_B: (h,), FC1_B: (fc1,), FC2_B: (h,)})
    elif a.qkv_bias:
        layer[QKV_B] = (a.qkv_rows,)
    if a.qk_norm:
        layer.update({Q_NORM: (a.head_dim,), K_NORM: (a.head_dim,)})
    if L > 0:
        s.update({LAYERS + k: (L,) + v for k, v in layer.items()})
    return s


def expected_hf_shapes(a: Arch) -> dict:
    """HF tensor names and shapes for ``a`` (the mapping run on meta tensors)."""
    meta = {k: torch.empty(v, device="meta") for k, v in megatron_global_shapes(a).items()}
    out = globals_to_hf(meta, a)
    for layer in range(a.num_layers):
        for name, value in layer_to_hf(layer_params(meta, layer), a).items():
            out[hf_layer_prefix(a, layer) + name] = value
    return {k: tuple(v.shape) for k, v in out.items()}


def describe(a: Arch) -> str:
    d = asdict(a)
    return ", ".join(f"{k}={v}" for k, v in d.items())


def check_checkpoint_shapes(specs: dict, a: Arch, where: str) -> None:
    """UserError unless the checkpoint's model tensors have the shapes ``a`` implies."""
    expected = megatron_global_shapes(a)
    stacked = {}
    for key, (shape, _) in specs.items():
        if key.startswith("optimizer."):
            continue
        name = split_layer_key(key)
        idx = key[len(LAYERS):].partition(".")[0] if name else ""
        if name and idx.isdigit():  # per-layer keys: compare as if stacked
            stacked.setdefault(LAYERS + name, [0, tuple(shape)])[0] += 1
        elif name:
            stacked[LAYERS + name] = [shape[0], tuple(shape[1:])]
        elif key in expected and tuple(shape) != tuple(expected[key]):
            raise UserError(f"{where}: {key} has shape {list(shape)} but the checkpoint's args imply "
                            f"{list(expected[key])} ({describe(a)}); the args do not describe these weights")
    for key, (n, shape) in stacked.items():
        if key in expected and (n,) + shape != tuple(expected[key]):
            raise UserError(f"{where}: {key} has shape {[n, *shape]} but the checkpoint's args imply "
                            f"{list(expected[key])} ({describe(a)}); the args do not describe these weights")
    present = set(specs) | set(stacked)
    missing = [k for k in expected if k not in present]
    if missing:
        raise UserError(f"{where}: the checkpoint lacks {missing[0]}"
                        + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
                        + f" that its args imply ({describe(a)})")

