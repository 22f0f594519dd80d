"""Parameters and GPU memory of a GPTModel at a TP x PP x DP layout, from its config alone.

Nothing here builds a model: these are closed-form counts, so they work for a 7B model on a laptop.

Parameters are counted module by module as megatron-core's ``GPTModel`` holds them (word and
learned position embeddings, per layer: input norm, fused QKV, output projection, pre-MLP norm,
FC1 (x2 with SwiGLU), FC2, biases unless ``--disable-bias-linear`` (QKV's kept by ``--add-qkv-bias``);
--qk-layernorm's per-head query and key norms; final norm; untied output
layer). Under tensor parallelism the matrices, the column-parallel biases and the embeddings are
split over TP; norms and the row-parallel biases (projection, FC2) are replicated. A pipeline
stage holds its ``num_layers / PP`` layers, the first stage the embeddings, the last the final norm
and the output layer (with tied embeddings and PP > 1, a copy of the word embedding).

Bytes per parameter (Megatron-LM's distributed optimizer table, docs/distrib_optimizer.md):
16-bit weights (2), fp32 gradients (4: the trainer builds DDP with ``grad_reduce_in_fp32``), fp32
main parameters (4, only for bf16/fp16 runs) and Adam's two fp32 moments (8; SGD momentum 4),
the last two sharded over DP by the distributed optimizer — 6 + 12/DP bytes for bf16 + Adam.
Muon keeps one fp32 momentum (4) on the 2-D hidden weights and Adam's two on what its chain leaves
to Adam (embeddings, output layer, norms, biases); ``dist_muon`` spreads the state over DP.

Activations per transformer layer and micro batch, in bytes (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", section 4 and table 2), with ``s`` sequence,
``b`` micro batch, ``h`` hidden, ``a`` heads, ``t`` TP size:

* no recomputation:   ``sbh (34 + 5as/h) / t`` with sequence parallelism (or t = 1),
                      ``sbh (10 + 24/t + 5as/(h t))`` with TP but no sequence parallelism;
* selective (attention core recomputed): the ``5as/h`` term goes: ``34 sbh / t``, ``sbh (10 + 24/t)``;
* full (each layer's input kept, the layer recomputed in backward): ``2 sbh / t`` with sequence
  parallelism (the stored input is sequence-sharded), ``2 sbh`` without. With Megatron's
  ``--recompute-method uniform --recompute-num-layers N`` one input is kept per chunk of N layers;
  with ``block`` the first N layers of each pipeline stage are recomputed and the others keep
  everything (the ``none`` amount).

The formula assumes 16-bit activations (doubled here for fp32 runs), GeLU with a 4h FFN and
multi-head attention; it is the paper's, applied as is to SwiGLU/GQA models (see docs/scaling.md).
Under the 1F1B pipeline schedule pipeline rank ``i`` holds ``min(PP - i, micro batches)`` micro
batches in flight, each with its ``num_layers / PP`` layers' activations; under interleaved 1F1B
(``vp`` virtual stages per rank, micro-batch groups of ``G``, default PP)
``min(2 (PP - i - 1) + (vp - 1) G + 1, vp x micro batches)``
model-chunk micro batches of ``num_layers / (PP vp)`` layers each (:func:`micro_batches_in_flight`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_staged.config import (Config, ModelConfig, pipeline_layer_counts, resolve_model, retarget_pipeline_split,
                                    virtual_pipeline_size)
from megatron_staged.errors import require

GIB = 2 ** 30
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
GRAD_BYTES = 4  # the trainer's DistributedDataParallelConfig(grad_reduce_in_fp32=True)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model, split by where they live."""
    num_layers: int
    word_embedding: int          # padded_vocab x hidden
    position_embedding: int      # max_position_embeddings x hidden (learned positions), else 0
    layer: int                   # one transformer layer
    layer_replicated: int        # of which replicated over TP (norms, row-parallel biases)
    final_norm: int
    output_layer: int            # untied output layer (0 when tied to the word embedding)
    layer_vectors: int = 0       # of a layer's, the 1-D ones (norms, biases; Adam's under Muon)

    @property
    def total(self) -> int:
        return (self.word_embedding + self.position_embedding + self.num_layers * self.layer
                + self.final_norm + self.output_layer)

    @property
    def non_embedding(self) -> int:
        return self.num_layers * self.layer + self.final_norm


def count_parameters(m: ModelConfig) -> ParamCounts:
    """Exact parameter count of megatron-core's GPTModel for this config (needs padded_vocab_size)."""
    resolve_model(m)
    require(m.padded_vocab_size is not None, "the vocabulary size is unknown: give --vocab-size or --padded-vocab-size")
    h, f, kv = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    a, g = m.num_attention_heads, m.num_query_groups
    bias = not m.disable_bias_linear
    norm = 2 * h if m.normalization == "LayerNorm" else h  # LayerNorm has a bias, RMSNorm not
    fc1_out = 2 * f if m.swiglu else f
    qkv_out = (a + 2 * g) * kv
    layer = (norm + h * qkv_out + (qkv_out if bias or m.add_qkv_bias else 0)  # input norm, QKV
             + a * kv * h + (h if bias else 0)                    # output projection
             + norm + h * fc1_out + (fc1_out if bias else 0)      # pre-MLP norm, FC1
             + f * h + (h if bias else 0))                        # FC2
    qk_norms = 2 * (2 * kv if m.normalization == "LayerNorm" else kv) if m.qk_layernorm else 0  # over a head
    layer += qk_norms
    replicated = 2 * norm + (2 * h if bias else 0) + qk_norms
    vectors = replicated + (qkv_out if bias or m.add_qkv_bias else 0) + (fc1_out if bias else 0)
    vh = m.padded_vocab_size * h
    return ParamCounts(
        num_layers=m.num_layers, word_embedding=vh,
        position_embedding=m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute" else 0,
        layer=layer, layer_replicated=replicated, final_norm=norm,
        output_layer=vh if m.untie_embeddings_and_output_weights else 0, layer_vectors=vectors)


def parameters_on_pipeline_rank(pc: ParamCounts, tp: int, pp: int, rank: int, layers: Optional[int] = None) -> int:
    """Parameters one GPU holds at pipeline rank ``rank`` (any TP rank: shards are equal), which holds
    ``layers`` transformer layers (default: an even split)."""
    if layers is None:
        require(pc.num_layers % pp == 0, f"{pc.num_layers} layers do not split over PP {pp}")
        layers = pc.num_layers // pp
    split = pc.layer - pc.layer_replicated
    require(split % tp == 0 and pc.word_embedding % tp == 0, f"the model does not split over TP {tp}")
    return layers * (split // tp + pc.layer_replicated) + _outside_layers(pc, tp, pp, rank)


def _outside_layers(pc: ParamCounts, tp: int, pp: int, rank: int) -> int:
    """Parameters outside the transformer layers on pipeline rank ``rank``: the embeddings on the
    first, the final norm and the output layer (tied: a copy of the word embedding) on the last."""
    n = 0
    if rank == 0:
        n += pc.word_embedding // tp + pc.position_embedding
    if rank == pp - 1:
        n += pc.final_norm
        if pc.output_layer:
            n += pc.output_layer // tp
        elif pp > 1:
            n += pc.word_embedding // tp  # tied: the last stage keeps a copy of the word embedding
    return n


def adam_parameters_under_muon(pc: ParamCounts, tp: int, pp: int, rank: int, layers: int) -> int:
    """Of :func:`parameters_on_pipeline_rank`'s, those megatron's Muon chain leaves to Adam: embeddings,
    the output layer (or the tied copy), norms and biases (Muon takes the 2-D hidden weights)."""
    column_biases = pc.layer_vectors - pc.layer_replicated  # QKV and FC1 biases, split over TP
    return layers * (column_biases // tp + pc.layer_replicated) + _outside_layers(pc, tp, pp, rank)


def activation_bytes_per_layer(m: ModelConfig, micro_batch_size: int, tp: int, sequence_parallel: bool,
                               recompute: str) -> float:
    """Korthikanti et al. (2022) activation memory of one layer for one micro batch, in bytes."""
    require(recompute in RECOMPUTE_GRANULARITIES,
            f"--recompute-granularity {recompute!r}: choose one of {', '.join(RECOMPUTE_GRANULARITIES)}")
    s, b, h, a, t = m.seq_length, micro_batch_size, m.hidden_size, m.num_attention_heads, tp
    sbh = s * b * h
    sp = sequence_parallel or t == 1
    attention_core = 0.0 if recompute == "selective" else 5 * a * s / h
    if recompute == "full":
        per = 2 * sbh / t if sp else 2 * sbh
    elif sp:
        per = sbh * (34 + attention_core) / t
    else:
        per = sbh * (10 + 24 / t + attention_core / t)
    return per * (1 if (m.bf16 or m.fp16) else 2)


@dataclass(frozen=True)
class Recompute:
    """Megatron's --recompute-granularity / --recompute-method / --recompute-num-layers."""
    granularity: str = "none"
    method: Optional[str] = None        # full only: uniform or block (None: uniform, 1 layer)
    num_layers: Optional[int] = None

    def __post_init__(self):
        require(self.granularity in RECOMPUTE_GRANULARITIES, f"--recompute-granularity {self.granularity!r}: "
                                                             f"choose one of {', '.join(RECOMPUTE_GRANULARITIES)}")
        require(self.method in (None, "uniform", "block"), f"--recompute-method {self.method!r}: uniform or block")
        require(self.num_layers is None or self.num_layers >= 1, "--recompute-num-layers must be >= 1")

    def __str__(self):
        if self.granularity == "full" and self.method:
            return f"full ({self.method}, {self.num_layers or 1} layer(s))"
        return self.granularity


def stage_activation_bytes(per_layer: dict, layers: int, recompute: Recompute) -> dict:
    """Activations of ``layers`` layers for one micro batch, per granularity; the ``full`` entry
    follows the configured method (uniform chunks of N layers, or the first N layers of a block)."""
    out = {r: v * layers for r, v in per_layer.items()}
    if recompute.granularity == "full" and recompute.method is not None:
        n = recompute.num_layers or 1
        if recompute.method == "uniform":
            out["full"] = per_layer["full"] * math.ceil(layers / n)
        else:
            k = min(n, layers)
            out["full"] = per_layer["full"] * k + per_layer["none"] * (layers - k)
    return out


@dataclass
class MemoryEstimate:
    """Bytes on the most loaded GPU (the pipeline rank whose total is largest)."""
    pipeline_rank: int
    parameters: int
    weights: float
    grads: float
    optimizer: float
    activations: dict = field(default_factory=dict)  # granularity -> bytes on that pipeline rank
    recompute: Recompute = Recompute()

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations[self.recompute.granularity]


def bytes_per_parameter(cfg: Config, dp: int) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter on one GPU."""
    sixteen_bit = cfg.model.bf16 or cfg.model.fp16
    o = cfg.optim
    # Muon keeps one momentum per 2-D hidden weight; embeddings and norms keep Adam's two (the
    # difference is added per rank in estimate_memory: MUON_ADAM_EXTRA)
    moments = {"adam": 8, "muon": 4, "dist_muon": 4}.get(o.optimizer, 4 if o.sgd_momentum else 0)
    optimizer = (4 if sixteen_bit else 0) + moments
    if cfg.parallel.use_distributed_optimizer or o.optimizer == "dist_muon":
        optimizer = optimizer / dp
    return (2 if sixteen_bit else 4), GRAD_BYTES, optimizer


MUON_ADAM_EXTRA = 4  # bytes of Adam's second moment on the parameters Muon's chain leaves to Adam


def micro_batches_in_flight(pp: int, rank: int, microbatches: int, vp: int = 1, group: Optional[int] = None) -> int:
    """Most (model chunk, micro batch) forward passes whose activations pipeline rank ``rank`` holds at
    once: the warm-up forwards of megatron-core's schedule plus the steady state's one
    (``get_pp_rank_microbatches``: ``PP - rank - 1`` warm-up micro batches for 1F1B;
    ``2 (PP - rank - 1) + (vp - 1) G`` model-chunk micro batches interleaved, ``G`` the micro batch
    group per virtual stage, PP by default), never more than the ``microbatches x vp`` there are. Each holds
    ``num_layers / (PP vp)`` layers' activations; for rank 0 interleaving gives Korthikanti et al.'s
    ``(1 + (PP - 1) / (PP vp))`` times the 1F1B amount."""
    if pp == 1:
        return 1
    warmup = pp - rank - 1 if vp == 1 else 2 * (pp - rank - 1) + (vp - 1) * (group or pp)
    return min(warmup + 1, microbatches * vp)


def with_pipeline(cfg: Config, pp: int) -> Config:
    """``cfg`` at pipeline size ``pp`` (an uneven split kept only at the configured size)."""
    if cfg.parallel.pipeline_model_parallel_size == pp:
        return cfg
    new = cfg.copy()
    retarget_pipeline_split(new, pp)
    return new


def estimate_memory(cfg: Config, tp: int, pp: int, dp: int, recompute="none") -> MemoryEstimate:
    """Peak training memory per GPU at TP x PP x DP (weights, grads, optimizer state, activations).

    ``recompute``: a :class:`Recompute` or a granularity name."""
    if isinstance(recompute, str):
        recompute = Recompute(recompute)
    m, t = cfg.model, cfg.training
    pc = count_parameters(m)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    microbatches = gbs // (t.micro_batch_size * dp)
    w, g, o = bytes_per_parameter(cfg, dp)
    per_layer = {r: activation_bytes_per_layer(m, t.micro_batch_size, tp, cfg.parallel.sequence_parallel, r)
                 for r in RECOMPUTE_GRANULARITIES}
    laid_out = with_pipeline(cfg, pp)
    vp = virtual_pipeline_size(laid_out) or 1
    counts = pipeline_layer_counts(laid_out)  # [rank][chunk] layers (uneven stages, virtual stages)
    best = None
    for rank in range(pp):
        n = parameters_on_pipeline_rank(pc, tp, pp, rank, sum(counts[rank]))
        optimizer = n * o
        if cfg.optim.optimizer in ("muon", "dist_muon"):
            share = 1 / dp if cfg.optim.optimizer == "dist_muon" else 1
            optimizer += adam_parameters_under_muon(pc, tp, pp, rank, sum(counts[rank])) * MUON_ADAM_EXTRA * share
        in_flight = micro_batches_in_flight(pp, rank, microbatches, vp,
                                            cfg.parallel.microbatch_group_size_per_virtual_pipeline_stage)
        # the passes in flight cycle over the rank's chunks: their mean size (chunks differ only when
        # the embedding/loss is counted in the split)
        chunks = [stage_activation_bytes(per_layer, c, recompute) for c in counts[rank]]
        acts = {r: in_flight * sum(c[r] for c in chunks) / len(chunks) for r in per_layer}
        est = MemoryEstimate(pipeline_rank=rank, parameters=n, weights=n * w, grads=n * g, optimizer=optimizer,
                             activations=acts, recompute=recompute)
        if best is None or est.total > best.total:
            best = est
    return best
