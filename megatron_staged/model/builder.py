"""Build megatron-core ``GPTModel``s for the gpt2 and llama families.

The model is a plain megatron-core ``GPTModel`` built from a layer spec: Transformer Engine's
spec when TE is installed and CUDA is available (fused attention, fused norms), else the "local"
spec (apex's fused LayerNorm when apex is installed, torch norms otherwise) whose core attention is
:class:`~megatron_staged.model.attention.SDPAttention` (torch's fused SDPA) on GPU and megatron's
``DotProductAttention`` on CPU (``--attention-backend`` chooses). The built model lives on the
current device (``torch.cuda.current_device()``; host memory under the CPU backend).

Initialisation is done here, not by megatron: every parameter is drawn from a generator seeded by
``(seed, checkpoint key, global layer index, row block)`` over its *global* shape, and each rank
keeps only its shard. So the same ``--seed`` gives the same global model at every TP/PP layout.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_staged.config import (VOCAB_PADDING_HINT, Config, ModelConfig, pad_vocab_size, resolve_model,
                                    sequence_parallel_active, virtual_pipeline_size)
from megatron_staged.errors import UserError


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(m: ModelConfig) -> bool:
    if m.transformer_impl == "local":
        return False
    available = torch.cuda.is_available() and have_transformer_engine()
    if m.transformer_impl == "transformer_engine" and not available:
        raise UserError("--transformer-impl transformer_engine needs CUDA and Transformer Engine; "
                        "use --transformer-impl local")
    return available


def check_sequence_parallel(cfg: Config, where: str = "") -> None:
    """--sequence-parallel at TP > 1 needs Transformer Engine's (or apex's) norms: megatron's torch
    norms refuse it. ``where``: the stage that reaches such a layout, for the message."""
    if sequence_parallel_active(cfg.parallel) and not use_transformer_engine(cfg.model):
        raise UserError(f"{where}--sequence-parallel needs Transformer Engine on a GPU (not available here); "
                        f"drop --sequence-parallel")


def attention_backend(cfg: Config) -> str:
    """'transformer_engine', 'sdpa' or 'local': the core attention the model will use."""
    if use_transformer_engine(cfg.model):
        return "transformer_engine"
    choice = cfg.performance.attention_backend
    if choice == "auto":
        return "sdpa" if torch.cuda.is_available() else "local"
    return choice


def _have_fused_softmax_kernels() -> bool:
    try:
        import scaled_masked_softmax_cuda  # noqa: F401  (apex / megatron's fused kernels)
        import scaled_upper_triang_masked_softmax_cuda  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def params_dtype(m: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if m.bf16 else torch.float16 if m.fp16 else torch.float32


def transformer_config(cfg: Config):
    """The megatron-core ``TransformerConfig`` for ``cfg`` (model + parallel sections)."""
    from megatron.core.transformer import TransformerConfig

    m, p, r = resolve_model(cfg.model), cfg.parallel, cfg.performance
    dtype = params_dtype(m)
    on_gpu = torch.cuda.is_available()
    check_sequence_parallel(cfg)
    extra = {}
    vp = virtual_pipeline_size(cfg)
    if vp is not None:  # interleaved 1F1B, configured as Megatron-LM's core_transformer_config_from_args does
        extra.update(virtual_pipeline_model_parallel_size=vp, overlap_p2p_comm=p.overlap_p2p_comm,
                     batch_p2p_comm=not p.overlap_p2p_comm,
                     microbatch_group_size_per_vp_stage=(p.microbatch_group_size_per_virtual_pipeline_stage
                                                         or p.pipeline_model_parallel_size))
    if p.pipeline_model_parallel_size > 1:  # uneven pipeline stages (validate checked the split)
        extra.update(num_layers_in_first_pipeline_stage=p.decoder_first_pipeline_num_layers,
                     num_layers_in_last_pipeline_stage=p.decoder_last_pipeline_num_layers,
                     account_for_embedding_in_pipeline_split=p.account_for_embedding_in_pipeline_split,
                     account_for_loss_in_pipeline_split=p.account_for_loss_in_pipeline_split)
    if m.num_layers == 0:
        # megatron's config derives the residual output projections' init from std/sqrt(2 num_layers);
        # a zero-layer model has no such projection, and init_global_weights() does the init anyway,
        # so name the init (the config's own extension point) instead of letting it divide by zero
        from megatron.core.utils import init_method_normal

        extra["output_layer_init_method"] = init_method_normal(m.init_method_std)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=not m.disable_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=bool(m.swiglu),
        activation_func=F.silu if m.swiglu else _squared_relu() if m.squared_relu else F.gelu,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        use_cpu_initialization=True,
        perform_initialization=False,  # init_global_weights() does it, layout-independently
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel_active(p),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=m.bf16,
        fp16=m.fp16,
        bias_activation_fusion=(on_gpu and not m.swiglu and not m.squared_relu and not m.disable_bias_linear
                                and m.bias_gelu_fusion),  # megatron-core fuses bias + GeLU/SwiGLU only
        bias_dropout_fusion=on_gpu and m.bias_dropout_fusion,
        masked_softmax_fusion=on_gpu and _have_fused_softmax_kernels() and m.masked_softmax_fusion,
        rotary_interleaved=m.rotary_interleaved,
        apply_rope_fusion=False,  # m.apply_rope_fusion needs TE's fused RoPE; not wired yet (docs/megatron_compat.md)
        attention_softmax_in_fp32=m.attention_softmax_in_fp32 or m.apply_query_key_layer_scaling,
        apply_query_key_layer_scaling=m.apply_query_key_layer_scaling,
        deterministic_mode=r.deterministic_mode,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=on_gpu,
        recompute_granularity=r.recompute_granularity,
        recompute_method=r.recompute_method,
        recompute_num_layers=r.recompute_num_layers,
        **extra,
    )


def _squared_relu():
    from megatron.core.activations import squared_relu  # Megatron-LM's --squared-relu

    return squared_relu


def layer_spec(cfg: Config):
    """The transformer layer's ``ModuleSpec``; for a zero-layer model, the block's spec with no
    layers (see :func:`block_spec`)."""
    if cfg.model.num_layers == 0:
        return block_spec(cfg)
    return _transformer_layer_spec(cfg)


def block_spec(cfg: Config):
    """``TransformerBlockSubmodules`` with no layer specs and the final norm the layer spec's block
    would get: a zero-layer model is embedding -> final norm -> output layer, built by megatron's own
    GPTModel and TransformerBlock through their spec argument."""
    from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules

    # LayerNormImpl: the final norm megatron's block gives a layer spec (TE's, apex's or torch's norm)
    return TransformerBlockSubmodules(layer_specs=[], layer_norm=LayerNormImpl)


def _transformer_layer_spec(cfg: Config):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    backend = attention_backend(cfg)
    if backend == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.model.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(normalization=cfg.model.normalization, qk_layernorm=cfg.model.qk_layernorm)
        if backend == "sdpa":
            from megatron_staged.model.attention import SDPAttention

            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    from megatron_staged.subnet import enabled as layer_drop_enabled

    if layer_drop_enabled(cfg):  # RaPTr / PLD: a TransformerLayer that a per-step mask can skip
        from megatron_staged.subnet.layers import subnet_layer_spec

        spec = subnet_layer_spec(spec)
    return spec


def build_model(cfg: Config, pre_process: bool, post_process: bool, vp_stage: Optional[int] = None):
    """A ``GPTModel`` holding this pipeline stage's layers (of virtual stage ``vp_stage`` under
    interleaved 1F1B), uninitialised (see init_global_weights)."""
    from megatron.core.models.gpt import GPTModel

    m = resolve_model(cfg.model)
    if m.padded_vocab_size is None:
        raise UserError("internal: padded_vocab_size is unset; call set_padded_vocab_size() first")
    tcfg = transformer_config(cfg)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=m.padded_vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    _mark_tensor_parallel_weights(model)
    # megatron built the weights in host memory (use_cpu_initialization: layout-independent init);
    # only the distributed optimizer's buffers would move them, so move the model here
    model.cuda(torch.cuda.current_device())
    return model


def _mark_tensor_parallel_weights(model) -> None:
    """Tag TP-sharded weights as megatron's CPU init would have.

    With ``use_cpu_initialization`` and ``perform_initialization=False`` megatron-core skips
    ``set_tensor_model_parallel_attributes`` on the weights, and grad-norm / clipping would then
    treat the shards as TP duplicates (counting only rank 0's).
    """
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if w is None or getattr(w, "tensor_model_parallel", False):
            continue
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(w, True, 0, 1)
        elif isinstance(mod, RowParallelLinear):
            set_tensor_model_parallel_attributes(w, True, 1, 1)


# the padded rows are real logits (in the softmax), so no layout change may re-pad a trained model
def set_padded_vocab_size(cfg: Config, vocab_size: int) -> int:
    """Pad once; keep the value already stored (e.g. from a checkpoint) when it splits over TP."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    if m.padded_vocab_size is None:
        m.padded_vocab_size = pad_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp, m.vocab_padding)
    elif m.padded_vocab_size % tp:
        raise UserError(f"padded vocabulary {m.padded_vocab_size} (from the checkpoint) is not "
                        f"divisible by --tensor-model-parallel-size {tp}; {VOCAB_PADDING_HINT.format(tp=tp)}")
    if m.padded_vocab_size < vocab_size:
        raise UserError(f"tokenizer vocabulary {vocab_size} exceeds the model's padded vocabulary "
                        f"{m.padded_vocab_size}")
    return m.padded_vocab_size


# ---- layout-independent initialisation ----------------------------------------------------------

_BLOCK_ELEMS = 1 << 20  # rows are drawn in blocks of ~1M elements, each with its own seed


def _seed_for(seed: int, key: str, layer: int, block: int) -> int:
    h = hashlib.sha256(f"{seed}/{key}/{layer}/{block}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def init_kind(key: str, cfg: ModelConfig) -> tuple[str, float]:
    """('ones'|'zeros'|'normal', std) for a checkpoint key, following megatron's init rules."""
    last = key.rsplit(".", 1)[-1]
    if "norm" in key and (last == "weight" or last.endswith("norm_weight")):
        return "ones", 0.0
    if last == "bias" or last.endswith("_bias"):
        return "zeros", 0.0
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        # megatron's scaled init for the output projections of residual branches
        return "normal", cfg.init_method_std / math.sqrt(2.0 * max(cfg.num_layers, 1))
    return "normal", cfg.init_method_std


def global_normal_slice(seed: int, key: str, layer: int, global_shape, offset, local_shape,
                        std: float) -> torch.Tensor:
    """Rows ``offset..offset+local_shape`` of a N(0, std^2) tensor of ``global_shape``.

    The tensor is defined block by block along dim 0, each block from its own seeded generator, so
    any slice can be produced without drawing the whole tensor, and identically at any layout.
    """
    global_shape = tuple(global_shape)
    row_numel = int(math.prod(global_shape[1:])) if len(global_shape) > 1 else 1
    rows_per_block = max(1, _BLOCK_ELEMS // max(row_numel, 1))
    r0, r1 = offset[0], offset[0] + local_shape[0]
    out = []
    for b in range(r0 // rows_per_block, (r1 - 1) // rows_per_block + 1):
        b0 = b * rows_per_block
        n = min(rows_per_block, global_shape[0] - b0)
        g = torch.Generator().manual_seed(_seed_for(seed, key, layer, b))
        block = torch.randn((n,) + global_shape[1:], generator=g) * std
        lo, hi = max(r0, b0) - b0, min(r1, b0 + n) - b0
        out.append(block[lo:hi])
    t = torch.cat(out, 0)
    idx = tuple(slice(o, o + s) for o, s in zip(offset[1:], local_shape[1:]))
    return t[(slice(None),) + idx]


def iter_sharded_tensors(sharded_sd):
    """Yield every ShardedTensor of a (model) sharded state dict, expanding factories."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for v in nested_values(sharded_sd):
        if isinstance(v, ShardedTensor):
            yield v
        elif isinstance(v, ShardedTensorFactory):
            built = v.build()
            for sub in nested_values(built) if isinstance(built, (dict, list)) else [built]:
                if isinstance(sub, ShardedTensor):
                    yield sub


def layer_axis(st) -> tuple[int, int]:
    """(global layer index or -1, number of prepended axes) of a ShardedTensor."""
    if st.prepend_axis_num:
        return st.global_offset[0], st.prepend_axis_num
    return -1, 0


@torch.no_grad()
def init_global_weights(model_chunks, cfg: Config, seed: int) -> None:
    """Initialise every parameter from its global identity (see module docstring)."""
    m = cfg.model
    for chunk in model_chunks:
        for st in iter_sharded_tensors(chunk.sharded_state_dict()):
            kind, std = init_kind(st.key, m)
            if kind == "ones":
                st.data.fill_(1.0)
            elif kind == "zeros":
                st.data.zero_()
            else:
                layer, n = layer_axis(st)
                vals = global_normal_slice(seed, st.key, layer, st.global_shape[n:],
                                           st.global_offset[n:], st.local_shape, std)
                st.data.copy_(vals.reshape(st.data.shape).to(st.data.dtype))


def unwrap(model):
    """The GPTModel inside DDP/Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def global_layers(model_chunks) -> list[int]:
    """The global (0-based) indices of the transformer layers this rank holds: under interleaved 1F1B
    the union over its chunks, each placed by megatron-core's own ``get_transformer_layer_offset``."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    out = []
    for chunk in model_chunks:
        g = unwrap(chunk)
        offset = get_transformer_layer_offset(g.config, vp_stage=getattr(g, "vp_stage", None))
        out += range(offset, offset + len(g.decoder.layers))
    return out


def count_parameters(cfg: Config) -> dict:
    """Global parameter counts (total, non-embedding) from the config alone."""
    m = resolve_model(cfg.model)
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    bias = 0 if m.disable_bias_linear else 1
    attn = h * (q + 2 * kv) + q * h + bias * (q + 2 * kv + h) + (1 - bias) * m.add_qkv_bias * (q + 2 * kv)
    mlp = h * f * (2 if m.swiglu else 1) + f * h + bias * ((2 if m.swiglu else 1) * f + h)
    norms = (2 if m.normalization == "LayerNorm" else 1) * h
    qk_norms = 2 * (2 if m.normalization == "LayerNorm" else 1) * m.kv_channels if m.qk_layernorm else 0
    layer = attn + mlp + 2 * norms + qk_norms
    V = m.padded_vocab_size or 0
    emb = V * h + (m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute" else 0)
    out = V * h if m.untie_embeddings_and_output_weights else 0
    total = L * layer + emb + out + norms
    return {"total": total, "non_embedding": L * layer + norms}
