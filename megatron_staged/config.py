"""One config tree <-> Megatron-style command-line flags <-> YAML.

Every field of the dataclasses below is a flag named after it (``hidden_size`` -> ``--hidden-size``),
the names Megatron-LM users already know. A YAML file given with ``--config`` may use the section
layout of this tree (``model: {hidden_size: 256}``) or flat keys (``hidden-size: 256``); flags given
on the command line override the file.

``model_family`` presets fill in the architecture switches a user did not set:

* ``gpt2``  LayerNorm, GeLU, learned absolute positions, biases, tied input/output embeddings;
* ``llama`` RMSNorm, SwiGLU, RoPE, no biases, untied output layer (GQA via ``--group-query-attention``).
"""
from __future__ import annotations

import argparse
import os
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Optional

from megatron_staged.errors import ArgumentParser, UserError, require


def _f(default=None, help: str = "", **kw):
    return field(default=default, metadata={"help": help, **kw})


def _lf(help: str = ""):
    return field(default_factory=list, metadata={"help": help})


@dataclass
class ModelConfig:
    model_family: str = _f("gpt2", "architecture preset: gpt2 or llama", choices=["gpt2", "llama"])
    num_layers: int = _f(4, "number of transformer layers (0 allowed: embedding + final norm + head)")
    hidden_size: int = _f(128)
    ffn_hidden_size: Optional[int] = _f(None, "default 4*hidden (gpt2) or 8/3*hidden rounded (llama)")
    num_attention_heads: int = _f(4)
    kv_channels: Optional[int] = _f(None, "head size; default hidden_size / num_attention_heads")
    group_query_attention: bool = _f(False)
    num_query_groups: Optional[int] = _f(None)
    seq_length: int = _f(128)
    max_position_embeddings: Optional[int] = _f(None, "default seq_length")
    position_embedding_type: Optional[str] = _f(None, "learned_absolute or rope", choices=["learned_absolute", "rope"])
    rotary_base: int = _f(10000)
    swiglu: Optional[bool] = _f(None, "SwiGLU MLP (llama default)")
    squared_relu: bool = _f(False, "squared ReLU MLP activation, relu(x)^2, no gated linear unit (Megatron-LM's; "
                                   "exclusive with --swiglu; sets swiglu off in the llama family)")
    normalization: Optional[str] = _f(None, "LayerNorm or RMSNorm", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _f(1e-5)
    untie_embeddings_and_output_weights: Optional[bool] = _f(None)
    disable_bias_linear: Optional[bool] = _f(None)
    qk_layernorm: bool = _f(False, "normalise each head's queries and keys (the --normalization kind, over the "
                                   "head size) before attention (Qwen3's layout with RMSNorm; exports as "
                                   "Qwen3ForCausalLM)")
    add_qkv_bias: bool = _f(False, "a bias on the QKV projection even with --disable-bias-linear (Qwen2's layout; "
                                   "exports as Qwen2ForCausalLM)")
    init_method_std: float = _f(0.02)
    hidden_dropout: float = _f(0.0)
    attention_dropout: float = _f(0.0)
    vocab_size: Optional[int] = _f(None, "vocabulary size for NullTokenizer / mock data")
    make_vocab_size_divisible_by: int = _f(128)
    padded_vocab_size: Optional[int] = _f(None, "set from the tokenizer; stored in checkpoints")
    bf16: bool = _f(False)
    fp16: bool = _f(False)
    transformer_impl: str = _f("auto", "auto (TE on GPU when installed), transformer_engine or local",
                               choices=["auto", "transformer_engine", "local"])
    # -- Megatron-LM compatibility (docs/megatron_compat.md) --
    rotary_percent: float = _f(1.0, "fraction of each head's channels that RoPE rotates")
    rotary_interleaved: bool = _f(False, "RoPE rotates adjacent channel pairs (2i, 2i+1) (RoFormer/GPT-J style) "
                                         "instead of the halves (i, i + d/2) (Llama style); megatron-core's "
                                         "rotary_interleaved")
    use_rope_scaling: bool = _f(False, "Llama 3.1's RoPE frequency scaling (megatron-core's: low/high frequency "
                                       "factors 1 and 4, original context 8192; factor --rope-scaling-factor)")
    rope_scaling_factor: float = _f(8.0, "with --use-rope-scaling: the factor long wavelengths are divided by")
    attention_softmax_in_fp32: bool = _f(False, "compute the attention softmax in fp32 (bf16/fp16 runs)")
    apply_query_key_layer_scaling: bool = _f(False, "scale Q K^T by 1/layer-number before an fp32 softmax that "
                                                    "multiplies it back (fp16 stability; the same attention "
                                                    "otherwise); implies --attention-softmax-in-fp32, as Megatron-LM")
    # kernel fusions: used on GPU when the kernels exist; CPU runs never fuse, whatever these say
    masked_softmax_fusion: bool = _f(True, "fused scale+mask+softmax (GPU)")
    bias_gelu_fusion: bool = _f(True, "fused bias+GeLU (GPU)")
    bias_swiglu_fusion: bool = _f(True, "fused bias+SwiGLU (GPU)")
    bias_dropout_fusion: bool = _f(True, "fused bias+dropout+add (GPU)")
    apply_rope_fusion: bool = _f(True, "fused RoPE (GPU, Transformer Engine); --no-rope-fusion turns it off")
    gradient_accumulation_fusion: bool = _f(True, "fused weight-gradient accumulation (GPU, apex/TE)")
    vocab_padding: str = _f("megatron", "pad the vocabulary to a multiple of divisible_by x TP (megatron, "
                            "Megatron-LM's rule) or of lcm(divisible_by, TP) (lcm: the same size at every TP "
                            "up to divisible_by)", choices=["megatron", "lcm"])


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1)
    pipeline_model_parallel_size: int = _f(1)
    sequence_parallel: bool = _f(False)
    use_distributed_optimizer: bool = _f(False)
    overlap_grad_reduce: bool = _f(False)
    overlap_param_gather: bool = _f(False)
    distributed_backend: str = _f("auto", "nccl on GPU, gloo on CPU", choices=["auto", "nccl", "gloo"])
    distributed_timeout_minutes: int = _f(10)
    enable_gloo_process_groups: bool = _f(True, "create megatron-core's extra gloo process groups next to the "
                                                "backend's (only a legacy --ckpt-format torch distributed "
                                                "optimizer load uses them); --disable-gloo-process-groups: not "
                                                "created, as Megatron-LM")
    # -- interleaved 1F1B (virtual pipeline stages), as Megatron-LM: give at most one of the two --
    num_layers_per_virtual_pipeline_stage: Optional[int] = _f(
        None, "interleaved 1F1B: layers per virtual pipeline stage (model chunk); a depth growth keeps it "
              "and adds virtual stages")
    num_virtual_stages_per_pipeline_rank: Optional[int] = _f(
        None, "interleaved 1F1B: virtual pipeline stages (model chunks) per pipeline rank; a depth growth "
              "keeps it and adds layers to every virtual stage")
    overlap_p2p_comm: bool = _f(True, "interleaved 1F1B: overlap pipeline send/recv with compute (Megatron-LM's "
                                      "default; --no-overlap-p2p-communication needs PP > 2)")
    # -- uneven pipeline stages, as Megatron-LM (megatron-core's num_layers_in_first/last_pipeline_stage) --
    decoder_first_pipeline_num_layers: Optional[int] = _f(
        None, "transformer layers on the first pipeline stage (the others split the rest evenly); a depth "
              "growth keeps it")
    decoder_last_pipeline_num_layers: Optional[int] = _f(
        None, "transformer layers on the last pipeline stage (the others split the rest evenly); a depth "
              "growth keeps it")
    account_for_embedding_in_pipeline_split: bool = _f(
        False, "count the embedding as one layer when splitting layers over pipeline stages (the first "
               "stage gets one transformer layer fewer)")
    account_for_loss_in_pipeline_split: bool = _f(
        False, "count the loss as one layer when splitting layers over pipeline stages (the last stage gets "
               "one transformer layer fewer)")
    microbatch_group_size_per_virtual_pipeline_stage: Optional[int] = _f(
        None, "interleaved 1F1B: micro-batches run back to back on one virtual stage before the next "
              "(Megatron-LM's; default the pipeline size; from PP to the number of micro-batches)")


@dataclass
class TrainingConfig:
    micro_batch_size: int = _f(1)
    global_batch_size: Optional[int] = _f(None, "default micro_batch_size * data-parallel size")
    train_iters: int = _f(100)
    seed: int = _f(1234)
    eval_interval: int = _f(0, "0 disables evaluation during training")
    eval_iters: int = _f(10, "validation batches per evaluation; 0: no evaluation (Megatron-LM)")
    log_interval: int = _f(10)
    exit_interval: Optional[int] = _f(None, "save and stop when the iteration is a multiple of this (0: off, "
                                            "as Megatron-LM)")
    exit_duration_in_mins: Optional[float] = _f(None, "save and stop once the job has run this many minutes (0: off, "
                                                      "as Megatron-LM)")
    exit_signal_handler: bool = _f(False, "on SIGTERM (what schedulers send before a kill): save and exit 0")
    on_non_finite: str = _f("stop", "non-finite loss or gradients: stop (save the last good state, exit 2) or "
                            "skip the step", choices=["stop", "skip"])
    max_consecutive_skipped_iterations: int = _f(10, "with --on-non-finite skip: stop after this many in a row")
    progress_bar: str = _f("auto", "auto: on rank 0 when stdout is a terminal", choices=["auto", "on", "off"])
    # -- Megatron-LM compatibility: sample-based training (exclusive with --train-iters) --
    train_samples: Optional[int] = _f(None, "train for this many sequences; --train-iters becomes "
                                      "train_samples // global_batch_size")


@dataclass
class OptimizerConfig:
    optimizer: str = _f("adam", "adam (AdamW), sgd, muon (Muon on 2-D hidden weights, Adam on the rest; "
                        "docs/muon.md) or dist_muon (muon, each DP rank updating whole layers)",
                        choices=["adam", "sgd", "muon", "dist_muon"])
    lr: float = _f(3e-4)
    min_lr: float = _f(0.0)
    lr_decay_style: str = _f("cosine", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_warmup_iters: int = _f(0)
    lr_warmup_init: float = _f(0.0)
    lr_decay_iters: Optional[int] = _f(None, "default train_iters")
    lr_wsd_decay_style: str = _f("exponential", choices=["exponential", "linear", "cosine", "minus_sqrt"])
    lr_wsd_decay_iters: Optional[int] = _f(None)
    weight_decay: float = _f(0.01)
    weight_decay_incr_style: str = _f("constant", "weight decay over the run: constant (--weight-decay), or "
                                                  "linear/cosine from --start-weight-decay to --end-weight-decay "
                                                  "over --train-iters (Megatron-LM's)",
                                      choices=["constant", "linear", "cosine"])
    start_weight_decay: Optional[float] = _f(None, "with --weight-decay-incr-style linear/cosine: the first value")
    end_weight_decay: Optional[float] = _f(None, "with --weight-decay-incr-style linear/cosine: the last value")
    clip_grad: float = _f(1.0)
    adam_beta1: float = _f(0.9)
    adam_beta2: float = _f(0.999)
    adam_eps: float = _f(1e-8)
    sgd_momentum: float = _f(0.9)
    # Muon (--optimizer muon / dist_muon), Megatron-LM's flags and defaults (docs/muon.md)
    muon_momentum: float = _f(0.9, "Muon: momentum (EMA of the gradient) before orthogonalisation")
    muon_split_qkv: bool = _f(True, "Muon: orthogonalise Q, K and V of the fused QKV weight separately "
                              "(Megatron-LM: --muon-no-split-qkv to turn off)")
    muon_use_nesterov: bool = _f(False, "Muon: Nesterov-style momentum")
    muon_scale_mode: str = _f("spectral", "Muon: update scale; spectral = sqrt(max(m, n))",
                              choices=["spectral", "unit_rms_norm", "shape_scaling"])
    muon_fp32_matmul_prec: str = _f("medium", "Muon: fp32 matmul precision in Newton-Schulz",
                                    choices=["low", "medium", "high"])
    muon_num_ns_steps: int = _f(5, "Muon: Newton-Schulz steps")
    muon_tp_mode: str = _f("blockwise", "Muon at TP > 1: blockwise (each TP shard on its own), duplicated "
                           "(the whole matrix on every rank: the TP-1 update) or distributed",
                           choices=["blockwise", "duplicated", "distributed"])
    muon_extra_scale_factor: float = _f(1.0, "Muon: extra factor on the update")
    # fp16 loss scaling, Megatron-LM's flags (bf16 needs none)
    loss_scale: Optional[float] = _f(None, "fp16: a constant loss scale; default dynamic scaling")
    initial_loss_scale: float = _f(2.0 ** 32, "fp16 dynamic scaling: the first scale")
    min_loss_scale: float = _f(1.0, "fp16 dynamic scaling: the scale never drops below this")
    loss_scale_window: int = _f(1000, "fp16 dynamic scaling: iterations without overflow before doubling")
    hysteresis: int = _f(2, "fp16 dynamic scaling: overflows tolerated before halving")

    # -- Megatron-LM compatibility: LR schedule in samples (with --train-samples) or as a fraction --
    lr_decay_samples: Optional[int] = _f(None, "sample-based: decay the LR over this many sequences "
                                         "(default --train-samples)")
    lr_warmup_samples: int = _f(0, "sample-based: warm the LR up over this many sequences")
    lr_wsd_decay_samples: Optional[int] = _f(None, "sample-based: WSD decay phase in sequences")
    lr_warmup_fraction: Optional[float] = _f(None, "warm up over this fraction of the decay span "
                                             "(instead of --lr-warmup-iters/--lr-warmup-samples)")
    accumulate_allreduce_grads_in_fp32: bool = _f(False, "keep gradients and their all-reduce in fp32 "
                                                  "with --bf16 (always the case here: see docs)")


@dataclass
class PerformanceConfig:
    """How the model computes (never what): kernels and activation recomputation."""
    attention_backend: str = _f("auto", "core attention of the local spec: auto (torch SDPA on GPU, megatron's "
                                "DotProductAttention on CPU), sdpa, or local; TE's spec uses TE's fused attention",
                                choices=["auto", "sdpa", "local"])
    recompute_granularity: Optional[str] = _f(None, "activation recomputation: full or selective",
                                              choices=["full", "selective"])
    recompute_method: Optional[str] = _f(None, "with --recompute-granularity full: uniform or block",
                                         choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = _f(None, "with --recompute-granularity full: layers per "
                                             "recomputed chunk (uniform) or per stage (block)")
    deterministic_mode: bool = _f(False, "Megatron-LM's: torch.use_deterministic_algorithms(True) and megatron-core's "
                                         "deterministic_mode; with NCCL, NCCL_ALGO must be set as Megatron-LM asks "
                                         "(CPU/gloo runs are deterministic anyway)")


@dataclass
class DataConfig:
    data_path: list = _lf("blend: PREFIX | PREFIX1 PREFIX2 | W1 PREFIX1 W2 PREFIX2")
    split: str = _f("969,30,1")
    mock_data: bool = _f(False)
    tokenizer_type: Optional[str] = _f(None, choices=["GPT2BPETokenizer", "SentencePieceTokenizer",
                                                      "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                                                      "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = _f(None)
    data_cache_path: Optional[str] = _f(None)
    num_workers: int = _f(0)
    default_corpus_dir: Optional[str] = _f(None, "cache for the built-in corpus (default ~/.cache/megatron_staged)")
    # -- Megatron-LM compatibility: per-split data and the tokenizers' file flags --
    data_args_path: Optional[str] = _f(None, "a file holding the --data-path blend (weights and prefixes, "
                                             "whitespace-separated), as Megatron-LM")
    per_split_data_args_path: Optional[str] = _f(None, "a JSON file {\"train\": [...], \"valid\": [...], "
                                                       "\"test\": [...]} of per-split blends, as Megatron-LM")
    train_data_path: list = _lf("blend for the training split only (instead of --data-path/--split)")
    valid_data_path: list = _lf("blend for the validation split only")
    test_data_path: list = _lf("blend for the test split only")
    builtin_corpus: bool = _f(False, "train on the built-in corpus (Python stdlib source, sentencepiece); "
                                    "what the quickstart uses")
    builtin_corpus_max_bytes: int = _f(8_000_000, "--builtin-corpus: bytes of stdlib source to take (documents "
                                               "shuffled; ~12 MB is all of CPython 3.11's)")
    vocab_file: Optional[str] = _f(None, "GPT2BPETokenizer: vocab.json (local file)")
    merge_file: Optional[str] = _f(None, "GPT2BPETokenizer: merges.txt (local file)")
    tiktoken_pattern: Optional[str] = _f(None, "TikTokenizer: v1 or v2", choices=["v1", "v2"])
    tiktoken_num_special_tokens: int = _f(1000, "TikTokenizer: ids reserved for special tokens")
    eod_mask_loss: bool = _f(False, "no loss on end-of-document tokens (megatron-core's GPTDataset, as Megatron-LM)")
    reset_position_ids: bool = _f(False, "position ids restart after each end-of-document token (megatron-core's "
                                         "GPTDataset; only learned absolute positions read them, as in Megatron-LM)")


@dataclass
class CheckpointConfig:
    save: Optional[str] = _f(None)
    load: Optional[str] = _f(None)
    save_interval: Optional[int] = _f(None, "save every this many iterations (and at the end); 0 only without "
                                            "--save, as Megatron-LM")
    no_save_optim: bool = _f(False)
    no_load_optim: bool = _f(False)
    no_load_rng: bool = _f(False)
    finetune: bool = _f(False, "load weights only; reset iteration, optimizer and data position")
    ckpt_format: str = _f("torch_dist", "torch_dist only (Megatron-LM's default); see docs/megatron_compat.md")
    override_opt_param_scheduler: bool = _f(False, "on --load, take the LR schedule from the flags, not the checkpoint")
    use_checkpoint_opt_param_scheduler: bool = _f(
        False, "on --load, take the LR schedule from the checkpoint (the default here) without a note when "
        "the flags differ", aliases=["--use-checkpoint-opt_param-scheduler"])
    ckpt_fallback_to_intact: bool = _f(False, "on --load, if the latest checkpoint is damaged, resume from the "
                                       "newest intact iteration (with a warning) instead of stopping")
    # -- Megatron-LM compatibility --
    exit_on_missing_checkpoint: bool = _f(False, "with --load: stop with an error if there is no checkpoint "
                                          "(default: start from scratch, as Megatron-LM does)")


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = _f(None)
    log_file: Optional[str] = _f(None, "also append per-iteration JSON records here (rank 0; strict JSON: a non-finite loss or grad norm is null)")
    # -- Megatron-LM compatibility: what the log line and TensorBoard show --
    log_throughput: bool = _f(False, "add 'throughput per GPU (TFLOP/s/GPU)' to the log line")
    log_params_norm: bool = _f(False, "add 'params norm' (L2 norm of all parameters) to the log line")
    tensorboard_log_interval: int = _f(1, "write TensorBoard scalars every this many iterations")
    log_timers_to_tensorboard: bool = _f(False, "write iteration-time (and throughput) to TensorBoard")
    log_validation_ppl_to_tensorboard: bool = _f(False, "write 'lm loss validation ppl' to TensorBoard")
    log_loss_scale_to_tensorboard: bool = _f(True, "write loss-scale to TensorBoard")
    log_world_size_to_tensorboard: bool = _f(False, "write world-size to TensorBoard")
    log_num_zeros_in_grad: bool = _f(False, "add 'num zeros' (gradient elements equal to zero over the whole "
                                            "model) to the log line and TensorBoard (Megatron-LM's)")
    log_memory_to_tensorboard: bool = _f(False, "write CUDA memory statistics (mem-reserved-bytes, ...) to "
                                                "TensorBoard, as Megatron-LM; nothing to write on CPU")
    wandb_project: Optional[str] = _f(None, "log to Weights & Biases under this project (needs wandb)")
    wandb_exp_name: Optional[str] = _f(None, "W&B run name")
    wandb_save_dir: Optional[str] = _f(None, "W&B local directory (default <tensorboard-dir>/wandb)")
    wandb_entity: Optional[str] = _f(None, "W&B entity (team)")


@dataclass
class StagingConfig:
    # A list of growth stages, given in YAML: [{at_iteration: 200, depth_factor: 2}, ...]. See
    # megatron_staged.staging for the keys.
    stages: list = _lf("growth stages (YAML only)")
    # slope triggers (staging/triggers.py): s = d log L / d log C over a trailing window of the curve
    slope_window_ratio: float = _f(2.0, "slope window: the last factor of compute, [C/ratio, C]")
    slope_min_points: int = _f(10, "iterations a slope window needs before it is trusted")
    slope_patience: int = _f(3, "consecutive slope estimates above the threshold before a trigger fires")
    slope_check_interval: int = _f(1, "evaluate slope triggers every N iterations")
    stop_at_optimality: bool = _f(False, "end the run (with a checkpoint) when the last stage's slope "
                                         "rises above --optimality-threshold (Shen et al.'s OPTIMALITY)")
    optimality_threshold: float = _f(-0.052, "slope above which training the current model is no longer "
                                             "compute-optimal")


@dataclass
class SubnetConfig:
    # RaPTr / progressive layer dropping (megatron_staged.subnet, docs/raptr.md)
    raptr_stages: Optional[str] = _f(None, "RaPTr: expected active layers per stage, e.g. 6,8,10,12 (of --num-layers)")
    raptr_keep_probs: Optional[str] = _f(None, "RaPTr: keep-probability of each non-fixed layer per stage, e.g. 0.5,0.75,1")
    raptr_stage_iters: Optional[str] = _f(None, "RaPTr: iterations per stage, e.g. 250,250,250,250 (default: equal split of --raptr-iters)")
    raptr_stage_split: str = _f("iterations", "RaPTr: split --raptr-iters into stages of equal iterations or equal FLOPs",
                                choices=["iterations", "flops"])
    raptr_iters: Optional[int] = _f(None, "RaPTr: iterations the schedule spans, all layers after (default --train-iters, "
                                          "or the first growth stage)")
    raptr_fixed_layers: str = _f("first,last", "RaPTr: always-kept layers: first,last | none | 1-based numbers, e.g. 1,6,12")
    raptr_rescale: bool = _f(False, "scale each kept layer's residual branch by 1/keep-prob (RaPTr and PLD; default off: "
                                    "the trained function stays the full model's, no jump at stage changes)")
    raptr_draw_per: str = _f("iteration", "one drop mask per iteration (all micro-batches and DP replicas) or per "
                                          "global micro-batch", choices=["iteration", "micro-batch"])
    progressive_layer_drop: bool = _f(False, "PLD baseline: keep layer l with 1-(l/L)(1-theta(t))")
    pld_theta: float = _f(0.5, "PLD: theta_bar, the keep-probability floor of the last layer")
    pld_gamma: float = _f(0.001, "PLD: decay rate of theta(t) per iteration")
    layer_drop_skip_optimizer_update: bool = _f(True, "leave parameters of layers that got no gradient in a step "
                                                      "(and their Adam moments) unchanged in that step")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    staging: StagingConfig = field(default_factory=StagingConfig)
    subnet: SubnetConfig = field(default_factory=SubnetConfig)

    # ---- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        apply_mapping(cfg, d, source="dict")
        return cfg

    def copy(self) -> "Config":
        return Config.from_dict(self.to_dict())


SECTIONS = [f.name for f in fields(Config)]


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    idx = {}
    for sec in fields(Config):
        for f in fields(sec.type if isinstance(sec.type, type) else globals()[sec.type]):
            assert f.name not in idx, f"duplicate config field {f.name}"
            idx[f.name] = (sec.name, f)
    return idx


FIELDS = _field_index()


def _base_type(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t[len("Optional["):-1] if t.startswith("Optional[") else t


def _coerce(name: str, f: dataclasses.Field, value):
    """Convert a flag string or YAML value to the field's type."""
    if value is None:
        return None
    base = _base_type(f)
    try:
        if base == "bool":
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base == "float":
            return float(value)
        if base == "list":
            return list(value) if isinstance(value, (list, tuple)) else [value]
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')}: cannot interpret {value!r} as {base}")
    return value


def set_value(cfg: Config, name: str, value) -> None:
    key = name.replace("-", "_")
    if key not in FIELDS:
        rule = MEGATRON_COMPAT.get("--" + key.replace("_", "-"))
        if rule is not None and rule.action == "refuse":  # a Megatron-LM setting that is refused: say why
            raise UserError(f"config key '{name}' (Megatron-LM's --{key.replace('_', '-')}): {rule.reason}")
        import difflib

        close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.8)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown config key '{name}'{hint}; see `megatron-staged train --help` for the flags")
    sec, f = FIELDS[key]
    value = coerce_field(key, f, value)
    setattr(getattr(cfg, sec), key, value)


def get_value(cfg: Config, name: str):
    sec, _ = FIELDS[name.replace("-", "_")]
    return getattr(getattr(cfg, sec), name.replace("-", "_"))


def apply_mapping(cfg: Config, d: dict, source: str) -> None:
    """Apply a nested (by section) or flat mapping of config values."""
    for k, v in (d or {}).items():
        kk = k.replace("-", "_")
        if kk in SECTIONS and isinstance(v, dict):
            apply_mapping(cfg, v, source)
        else:
            try:
                set_value(cfg, kk, v)
            except UserError as e:
                raise UserError(f"{source}: {e}")


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as fh:
            d = yaml.safe_load(fh) or {}
    except OSError as e:
        raise UserError(f"--config: cannot read {path}: {e.strerror}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"--config: {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}")
    require(isinstance(d, dict), f"--config: {path} must hold a mapping of config keys")
    return d


def add_field_flag(group, name: str, f: dataclasses.Field, default=argparse.SUPPRESS) -> None:
    """One flag for one dataclass field: ``--name-with-dashes``; bools get ``--no-...`` too."""
    flag = "--" + name.replace("_", "-")
    t = f.type if isinstance(f.type, str) else str(f.type)
    help_ = f.metadata.get("help", "")
    if "bool" in t:
        group.add_argument(flag, *f.metadata.get("aliases", []), dest=name, action="store_true", default=default,
                           help=help_)
        group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                           default=default, help=argparse.SUPPRESS)
    elif t == "list":
        group.add_argument(flag, dest=name, nargs="+", default=default, help=help_)
    else:
        choices = f.metadata.get("choices")
        if choices and not all(isinstance(c, str) for c in choices):
            choices = None  # argparse compares the raw string; coerce_field checks typed choices
        group.add_argument(flag, dest=name, default=default, help=help_, choices=choices)


def coerce_field(name: str, f: dataclasses.Field, value, label: Optional[str] = None):
    """A flag string or YAML value as the field's type, checked against its choices.

    ``label`` names the value in errors (default ``--name``), e.g. ``staging.stages[1].depth_init``.
    """
    label = label or "--" + name.replace("_", "-")
    try:
        value = _coerce(name, f, value)
    except UserError:
        raise UserError(f"{label}: cannot interpret {value!r} as {_base_type(f)}") from None
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise UserError(f"{label}: {value!r} is not one of {list(choices)}")
    return value


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field. Defaults are SUPPRESSed so we know what the user gave."""
    parser.add_argument("--config", default=None, help="YAML file; flags override it")
    parser.allow_abbrev = False  # as Megatron-LM: a prefix of a flag is not that flag
    for sec in SECTIONS:
        group = parser.add_argument_group(sec)
        for name, (s, f) in FIELDS.items():
            if s != sec or name == "stages":
                continue
            add_field_flag(group, name, f)
    add_megatron_compat_flags(parser)


def config_from_args(ns: argparse.Namespace, base: Optional[Config] = None) -> Config:
    cfg = base.copy() if base is not None else Config()
    explicit: set[str] = set()
    if getattr(ns, "config", None):
        d = load_yaml(ns.config)
        apply_mapping(cfg, d, source=f"--config {ns.config}")
        explicit |= _flat_keys(d)
    for name in FIELDS:
        if hasattr(ns, name) and not (name in MEGATRON_VALUES and getattr(ns, name) in MEGATRON_VALUES[name]):
            set_value(cfg, name, getattr(ns, name))
            explicit.add(name)
    recorded = getattr(ns, "_megatron_flags", None) or []
    for name, values in MEGATRON_VALUES.items():  # Megatron-LM values of fields that name them differently
        if isinstance(getattr(ns, name, None), str) and getattr(ns, name) in values:
            new, why = values[getattr(ns, name)]
            if os.environ.get("RANK", "0") == "0":
                print(f"note: --{name.replace('_', '-')} {getattr(ns, name)} accepted as {new}: {why}", flush=True)
            set_value(cfg, name, new)
    for note in apply_megatron_compat(cfg, recorded):
        if os.environ.get("RANK", "0") == "0":
            print(f"note: {note}", flush=True)
    explicit |= {k for flag, _ in recorded for k in (MEGATRON_COMPAT[flag].sets or {})
                 if flag in MEGATRON_COMPAT}
    cfg._explicit = explicit  # what the user set (flags or file), e.g. to check against a checkpoint
    return cfg


def _flat_keys(d: dict) -> set[str]:
    keys = set()
    for k, v in d.items():
        kk = k.replace("-", "_")
        keys |= _flat_keys(v) if kk in SECTIONS and isinstance(v, dict) else {kk}
    return keys


def parse_config(argv: list[str]) -> Config:
    p = ArgumentParser(prog="megatron-staged train")
    add_config_flags(p)
    return config_from_args(p.parse_args(argv))


# ---- derived values and validation --------------------------------------------------------

_PRESETS = {
    "gpt2": dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
                 untie_embeddings_and_output_weights=False, disable_bias_linear=False),
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                  untie_embeddings_and_output_weights=True, disable_bias_linear=True),
}


def resolve_model(m: ModelConfig) -> ModelConfig:
    """Fill unset architecture switches from the family preset and derived sizes (in place)."""
    if m.squared_relu:  # Megatron-LM: `assert not args.swiglu`; squared ReLU has no gated linear unit
        require(not m.swiglu, "--squared-relu and --swiglu are exclusive (Megatron-LM asserts not args.swiglu); "
                              "give one of them")
        m.swiglu = False
    for k, v in _PRESETS[m.model_family].items():
        if getattr(m, k) is None:
            setattr(m, k, v)
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.ffn_hidden_size is None:
        if m.swiglu:
            # Megatron-LM's rule: 2/3 of 4h, rounded down to a multiple of 64
            m.ffn_hidden_size = int((4 * m.hidden_size * 2 / 3) / 64) * 64
            require(m.ffn_hidden_size > 0, f"--swiglu with --hidden-size {m.hidden_size} rounds the FFN size "
                    "down to 0 (Megatron-LM's 2/3*4h rule, multiple of 64); set --ffn-hidden-size")
        else:
            m.ffn_hidden_size = 4 * m.hidden_size
    if m.kv_channels is None:
        require(m.hidden_size % m.num_attention_heads == 0,
                f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                f"{m.num_attention_heads}; set --kv-channels or change one of them")
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if not m.group_query_attention:
        m.num_query_groups = m.num_attention_heads
    elif m.num_query_groups is None:
        raise UserError("--group-query-attention needs --num-query-groups")
    return m


# what to do when a padded vocabulary does not split over a TP (the model builder and growth say it)
VOCAB_PADDING_HINT = ("the padding is fixed when a model is first built (its padded rows are logits too): use a TP "
                      "that divides it, or start runs meant for TP {tp} with --make-vocab-size-divisible-by a "
                      "multiple of {tp}")


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int, style: str = "megatron") -> int:
    """Pad the vocabulary so it splits evenly over TP ranks.

    ``megatron`` (the default, Megatron-LM's rule) pads to a multiple of ``divisible_by * TP``, which
    makes the padded size, and so the softmax over padded logits, depend on the layout the run
    *started* with. ``lcm`` pads to a multiple of ``lcm(divisible_by, TP)``: with the default 128 the
    padded size is the same for every TP up to 128. Either way the padded size is stored in the
    checkpoint and kept on resume, reshard, growth and export (it only has to divide by the new TP).
    """
    multiple = divisible_by * tp if style == "megatron" else math.lcm(divisible_by, tp)
    return int(math.ceil(vocab_size / multiple) * multiple)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_split(split: str) -> list[float]:
    """Megatron's ``--split 969,30,1`` (or ``98/2/0``): up to three non-negative weights, positive sum."""
    # quotes: launch scripts often pass --split '99,1,0' with its quotes (Megatron-LM's regex ignores them)
    parts = str(split).strip().strip("'\"").replace("/", ",").split(",")
    try:
        w = [float(x) for x in parts]
    except ValueError:
        raise UserError(f"--split {split!r}: expected up to three comma-separated numbers, e.g. 969,30,1") from None
    require(1 <= len(w) <= 3 and all(math.isfinite(x) and x >= 0 for x in w) and sum(w) > 0,
            f"--split {split!r}: expected up to three non-negative numbers with a positive sum, e.g. 969,30,1")
    return w


def check_values(cfg: Config) -> None:
    """Every number in range, before anything is built (no world size needed); UserError naming the flag.

    Sizes, iterations, batch sizes and learning rates that are zero or negative (or NaN) would
    otherwise surface as AssertionError / ZeroDivisionError deep inside megatron-core, or as a
    run that silently does nothing.
    """
    positive = {  # must be >= 1 (or > 0 for floats)
        "model": ["hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by",
                  "ffn_hidden_size", "kv_channels", "num_query_groups", "max_position_embeddings", "vocab_size",
                  "rotary_base", "norm_epsilon", "rope_scaling_factor"],
        "parallel": ["tensor_model_parallel_size", "pipeline_model_parallel_size", "distributed_timeout_minutes"],
        "training": ["micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                     "max_consecutive_skipped_iterations"],
        "optim": ["lr", "lr_decay_iters", "lr_wsd_decay_iters", "adam_eps"],
    }
    non_negative = {
        "model": ["num_layers", "init_method_std", "hidden_dropout", "attention_dropout"],
        # --eval-iters 0: no evaluation; --eval-interval, --exit-interval, --exit-duration-in-mins,
        # --save-interval 0: off, as Megatron-LM's training loop reads them (`if args.exit_interval and ...`)
        "training": ["seed", "eval_interval", "eval_iters", "exit_interval", "exit_duration_in_mins"],
        "checkpoint": ["save_interval"],
        "optim": ["min_lr", "lr_warmup_iters", "lr_warmup_init", "weight_decay", "clip_grad", "adam_beta1",
                  "adam_beta2", "sgd_momentum"],
        "data": ["num_workers"],
    }
    for table, strict in ((positive, True), (non_negative, False)):
        for sec, names in table.items():
            for name in names:
                v = getattr(getattr(cfg, sec), name)
                if v is None or isinstance(v, bool):
                    continue
                ok = math.isfinite(v) and (v > 0 if strict else v >= 0)
                require(ok, f"{_flag(name)} {v} must be {'positive' if strict else 'non-negative'}"
                            f"{' (> 0)' if strict else ' (>= 0)'}")
    m, o = cfg.model, cfg.optim
    for name in ("hidden_dropout", "attention_dropout"):
        require(getattr(m, name) < 1, f"{_flag(name)} {getattr(m, name)} must be below 1")
    for name in ("adam_beta1", "adam_beta2"):
        require(getattr(o, name) < 1, f"{_flag(name)} {getattr(o, name)} must be below 1 (e.g. 0.9, 0.999)")
    require(o.min_lr <= o.lr, f"--min-lr {o.min_lr} exceeds --lr {o.lr}")
    require(not (cfg.checkpoint.save and cfg.checkpoint.save_interval == 0),
            "--save-interval 0 with --save: Megatron-LM's validate_args refuses it too (save_interval > 0); "
            "drop --save-interval to save only at the end of the run")
    require(o.lr_warmup_init <= o.lr, f"--lr-warmup-init {o.lr_warmup_init} exceeds --lr {o.lr}")
    require(m.padded_vocab_size is None or m.padded_vocab_size > 0,
            f"--padded-vocab-size {m.padded_vocab_size} must be positive (> 0)")
    require(m.padded_vocab_size is None or m.vocab_size is None or m.padded_vocab_size >= m.vocab_size,
            f"--padded-vocab-size {m.padded_vocab_size} is smaller than --vocab-size {m.vocab_size}")
    parse_split(cfg.data.split)


def validate_muon(cfg: Config) -> None:
    """Megatron-LM's checks for --optimizer muon/dist_muon (megatron-core 0.16.1 supports no more)."""
    o, p = cfg.optim, cfg.parallel
    if o.optimizer not in ("muon", "dist_muon"):
        return
    flag = f"--optimizer {o.optimizer}"
    require(not p.use_distributed_optimizer,
            f"{flag} does not work with --use-distributed-optimizer (megatron-core's Muon orthogonalises whole "
            f"matrices; the distributed optimizer shards flat buffer ranges): drop it, and use --optimizer "
            f"dist_muon to spread the optimizer state over the DP ranks by layer")
    require(not (p.overlap_grad_reduce or p.overlap_param_gather),
            f"{flag} does not support --overlap-grad-reduce/--overlap-param-gather; drop them")
    require(not cfg.model.fp16, f"{flag} does not support --fp16 (megatron-core's Muon has no loss scaling); "
                                f"use --bf16 or fp32")
    require(0 <= o.muon_momentum < 1, f"--muon-momentum {o.muon_momentum} must be in [0, 1)")
    require(o.muon_num_ns_steps >= 1, f"--muon-num-ns-steps {o.muon_num_ns_steps} must be >= 1")


def sequence_parallel_active(p: "ParallelConfig") -> bool:
    """Whether sequence parallelism runs: --sequence-parallel at TP > 1. At TP 1 Megatron-LM turns it
    off ("Disabling sequence parallelism because tensor model parallelism is disabled"); here the flag
    is kept in the config, so that a width growth to TP > 1 (or a resume there) turns it on."""
    return bool(p.sequence_parallel) and p.tensor_model_parallel_size > 1


def validate_performance(cfg: Config) -> None:
    """Recomputation, overlap and loss-scaling flags, checked as Megatron-LM checks them."""
    r, o, p = cfg.performance, cfg.optim, cfg.parallel
    if p.overlap_param_gather:
        require(p.use_distributed_optimizer and p.overlap_grad_reduce,
                "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    if r.recompute_granularity == "full":
        require(r.recompute_method is not None and r.recompute_num_layers is not None,
                "--recompute-granularity full needs --recompute-method (uniform or block) and "
                "--recompute-num-layers N")
        require(r.recompute_num_layers >= 1, "--recompute-num-layers must be >= 1")
    else:
        require(r.recompute_method is None and r.recompute_num_layers is None,
                "--recompute-method and --recompute-num-layers need --recompute-granularity full")
    require(o.loss_scale is None or o.loss_scale > 0, "--loss-scale must be > 0")
    require(o.min_loss_scale > 0 and o.initial_loss_scale >= o.min_loss_scale,
            f"--initial-loss-scale {o.initial_loss_scale} must be >= --min-loss-scale {o.min_loss_scale} > 0")
    require(o.loss_scale_window >= 1 and o.hysteresis >= 1, "--loss-scale-window and --hysteresis must be >= 1")


def virtual_pipeline_size(cfg: Config) -> Optional[int]:
    """Megatron-LM's ``virtual_pipeline_model_parallel_size``: model chunks per pipeline rank, or None
    (plain 1F1B) when neither interleaving flag is given, it comes to 1, or there is no pipeline (a
    tool that builds a checkpoint's model at PP 1; :func:`validate` refuses the flags without PP)."""
    vp = _requested_virtual_pipeline_size(cfg)
    return vp if cfg.parallel.pipeline_model_parallel_size > 1 else None


def _requested_virtual_pipeline_size(cfg: Config) -> Optional[int]:
    p, L = cfg.parallel, cfg.model.num_layers + _split_extra_layers(cfg)
    if p.num_layers_per_virtual_pipeline_stage is not None:
        pp = p.pipeline_model_parallel_size
        vp = L // pp // p.num_layers_per_virtual_pipeline_stage if L % pp == 0 else None
    else:
        vp = p.num_virtual_stages_per_pipeline_rank
    return vp if vp and vp > 1 else None


def _split_extra_layers(cfg: Config) -> int:
    """Megatron-LM's --account-for-embedding/loss-in-pipeline-split: the embedding and the loss each
    counted as one layer of the pipeline split."""
    p = cfg.parallel
    return int(p.account_for_embedding_in_pipeline_split) + int(p.account_for_loss_in_pipeline_split)


def uneven_pipeline(cfg: Config) -> bool:
    p = cfg.parallel
    return (p.decoder_first_pipeline_num_layers is not None or p.decoder_last_pipeline_num_layers is not None
            or bool(_split_extra_layers(cfg)))


def pipeline_layer_counts(cfg: Config) -> list:
    """Transformer layers of each model chunk on each pipeline rank, ``[rank][chunk]``, as megatron-core
    builds them (``get_num_layers_to_build``: --decoder-first/last-pipeline-num-layers take their
    layers and the middle ranks split the rest evenly; --account-for-embedding/loss-in-pipeline-split
    count the embedding / loss as a layer of the first / last stage; interleaved 1F1B splits each
    rank's layers evenly over its chunks). Raises UserError where Megatron would refuse the split."""
    p, L = cfg.parallel, cfg.model.num_layers
    pp, vp = p.pipeline_model_parallel_size, virtual_pipeline_size(cfg) or 1
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    if pp == 1:
        return [[L]]
    if first is not None or last is not None:
        require(not _split_extra_layers(cfg),
                "--decoder-first/last-pipeline-num-layers and --account-for-embedding/loss-in-pipeline-split "
                "are exclusive (Megatron-LM's rule); give one way of splitting")
        for flag, v in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
            require(v is None or v >= 1, f"{flag} {v} must be >= 1")
        middle_ranks = pp - (first is not None) - (last is not None)
        middle_layers = L - (first or 0) - (last or 0)
        require(middle_layers >= 0 and bool(middle_layers) == bool(middle_ranks) and
                (middle_ranks == 0 or middle_layers % middle_ranks == 0),
                f"--num-layers {L} less the first/last pipeline stages' layers ({first or 0} + {last or 0}) "
                f"leaves {middle_layers}, which does not split evenly over the {middle_ranks} other pipeline "
                f"stage(s) of --pipeline-model-parallel-size {pp}")
        per = [middle_layers // middle_ranks if middle_ranks else 0] * pp
        if first is not None:
            per[0] = first
        if last is not None:
            per[-1] = last
        extra_first = extra_last = 0
    else:
        extra_first, extra_last = int(p.account_for_embedding_in_pipeline_split), int(p.account_for_loss_in_pipeline_split)
        total = L + extra_first + extra_last
        what = ("" if not (extra_first or extra_last) else
                f" (with the {' and '.join(n for n, x in (('embedding', extra_first), ('loss', extra_last)) if x)} "
                f"counted as a layer: {total})")
        require(total % pp == 0, f"--num-layers {L}{what} is not divisible by --pipeline-model-parallel-size {pp}; "
                                 f"use a PP size that divides the layer count")
        per = [total // pp] * pp
    for rank, n in enumerate(per):
        require(n % vp == 0, f"pipeline stage {rank} holds {n} layer slots, not divisible by its {vp} virtual "
                             f"pipeline stages (interleaved 1F1B)")
    counts = [[n // vp] * vp for n in per]
    counts[0][0] -= extra_first
    counts[-1][-1] -= extra_last
    require(counts[0][0] >= 0 and counts[-1][-1] >= 0,
            "--account-for-embedding/loss-in-pipeline-split: the first/last pipeline stage would hold fewer "
            "than zero transformer layers; use fewer pipeline stages")
    return counts


def retarget_pipeline_split(cfg: Config, pp: int, first: Optional[int] = None, last: Optional[int] = None) -> None:
    """Set the pipeline size of a checkpoint's or a grown model's config, and its uneven split: given
    first/last stage layer counts (0: none) replace the run's split settings; else they are kept while
    the PP size is and dropped when it changes (they were chosen for the old PP)."""
    p = cfg.parallel
    if first is not None or last is not None:
        p.decoder_first_pipeline_num_layers = first or None
        p.decoder_last_pipeline_num_layers = last or None
        p.account_for_embedding_in_pipeline_split = p.account_for_loss_in_pipeline_split = False
    elif pp != p.pipeline_model_parallel_size:
        p.decoder_first_pipeline_num_layers = p.decoder_last_pipeline_num_layers = None
        p.account_for_embedding_in_pipeline_split = p.account_for_loss_in_pipeline_split = False
    p.pipeline_model_parallel_size = pp


def validate_virtual_pipeline(cfg: Config) -> None:
    """Megatron-LM's checks for --num-layers-per-virtual-pipeline-stage /
    --num-virtual-stages-per-pipeline-rank (arguments.py validate_args, core_v0.16.1)."""
    p, L = cfg.parallel, cfg.model.num_layers
    lpvs, nvs = p.num_layers_per_virtual_pipeline_stage, p.num_virtual_stages_per_pipeline_rank
    if lpvs is None and nvs is None:
        return
    require(lpvs is None or nvs is None, "give only one of --num-layers-per-virtual-pipeline-stage and "
                                         "--num-virtual-stages-per-pipeline-rank")
    pp = p.pipeline_model_parallel_size
    if lpvs is not None:
        require(lpvs >= 1, f"--num-layers-per-virtual-pipeline-stage {lpvs} must be >= 1")
        require(L > 0, "--num-layers-per-virtual-pipeline-stage: a zero-layer model has no layers to "
                       "interleave; drop the flag")
        n = L + _split_extra_layers(cfg)  # Megatron-LM counts the embedding/loss layers of the split here
        require((n // pp) % lpvs == 0,
                f"--num-layers {L}{f' (+{n - L} counted for the embedding/loss)' if n > L else ''} / "
                f"--pipeline-model-parallel-size {pp} = {n // pp} layers per pipeline stage "
                f"is not divisible by --num-layers-per-virtual-pipeline-stage {lpvs}")
    else:
        require(nvs >= 1, f"--num-virtual-stages-per-pipeline-rank {nvs} must be >= 1")
    vp = _requested_virtual_pipeline_size(cfg)
    if vp is None:
        return
    require(L > 0, "interleaved 1F1B: a zero-layer model has no layers to interleave; drop the virtual "
                   "pipeline flag")
    if not uneven_pipeline(cfg):  # else pipeline_layer_counts checks each stage's layers
        require(L % (pp * vp) == 0,
                f"--num-layers {L} is not divisible by --pipeline-model-parallel-size {pp} x "
                f"{vp} virtual stages per pipeline rank; choose a multiple of {pp * vp} layers")
    if p.overlap_p2p_comm:
        require(pp > 1, f"interleaved 1F1B ({vp} virtual stages per pipeline rank) needs "
                        f"--pipeline-model-parallel-size > 1; drop the virtual pipeline flag")
    else:
        require(pp > 2, "interleaved 1F1B with --no-overlap-p2p-communication needs "
                        "--pipeline-model-parallel-size > 2 (Megatron-LM's rule); drop "
                        "--no-overlap-p2p-communication")


def validate(cfg: Config, world_size: int) -> None:
    """Check values, the layout and batch arithmetic; raise UserError with the fix."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.training, cfg.optim
    check_values(cfg)
    resolve_model(m)
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    require(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    require(m.num_attention_heads % tp == 0,
            f"--num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}; use a TP size that divides the head count")
    require(m.num_query_groups % tp == 0,
            f"--num-query-groups {m.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    require(m.num_attention_heads % m.num_query_groups == 0,
            f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups {m.num_query_groups}")
    require(m.ffn_hidden_size % tp == 0,
            f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    require(m.num_layers >= 0, "--num-layers must be >= 0")
    require(m.num_layers > 0 or pp == 1, "a zero-layer model cannot be pipelined; use --pipeline-model-parallel-size 1")
    require(pp > 1 or (p.decoder_first_pipeline_num_layers is None and p.decoder_last_pipeline_num_layers is None),
            "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    require(p.num_layers_per_virtual_pipeline_stage is None or
            (p.decoder_first_pipeline_num_layers is None and p.decoder_last_pipeline_num_layers is None),
            "with --decoder-first/last-pipeline-num-layers give the interleaving as "
            "--num-virtual-stages-per-pipeline-rank (Megatron-LM's rule), not --num-layers-per-virtual-pipeline-stage")
    validate_virtual_pipeline(cfg)
    pipeline_layer_counts(cfg)
    require(m.num_layers > 0 or cfg.performance.recompute_granularity != "full",
            "--recompute-granularity full: a zero-layer model has no layers to recompute; drop the flag")
    require(not m.use_rope_scaling or m.position_embedding_type == "rope",
            "--use-rope-scaling scales rotary embeddings; it needs --position-embedding-type rope")
    require(m.max_position_embeddings >= m.seq_length or m.position_embedding_type == "rope",
            f"--max-position-embeddings {m.max_position_embeddings} < --seq-length {m.seq_length}")
    require(not (m.bf16 and m.fp16), "choose one of --bf16 and --fp16")
    validate_performance(cfg)
    validate_muon(cfg)
    validate_megatron(cfg, world_size)
    require(world_size % (tp * pp) == 0,
            f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; "
            f"launch a multiple of {tp * pp} processes (torchrun --nproc-per-node)")
    dp = world_size // (tp * pp)
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}; choose a multiple of "
            f"{t.micro_batch_size * dp}")
    vp = virtual_pipeline_size(cfg)
    g = p.microbatch_group_size_per_virtual_pipeline_stage
    require(g is None or vp is not None, "--microbatch-group-size-per-virtual-pipeline-stage is for interleaved "
                                         "1F1B; give a virtual pipeline flag too, or drop it")
    if vp is not None:  # megatron-core's interleaved schedule: micro-batch groups of g (default PP)
        nmb = t.global_batch_size // (t.micro_batch_size * dp)
        batch = (f"{nmb} micro-batches = --global-batch-size {t.global_batch_size} / (--micro-batch-size "
                 f"{t.micro_batch_size} x DP {dp})")
        if g is None:
            require(nmb % pp == 0,
                    f"interleaved 1F1B needs the number of micro-batches to be a multiple of "
                    f"--pipeline-model-parallel-size {pp} ({batch}); choose --global-batch-size a multiple of "
                    f"{t.micro_batch_size * dp * pp}")
        else:  # megatron-core's checks (schedules.forward_backward_pipelining_with_interleaving)
            require(pp <= g <= nmb, f"--microbatch-group-size-per-virtual-pipeline-stage {g} must lie between "
                                    f"--pipeline-model-parallel-size {pp} and the number of micro-batches ({batch})")
            require(nmb % g == 0 or nmb % g >= pp,
                    f"--microbatch-group-size-per-virtual-pipeline-stage {g}: the last group has {nmb % g} "
                    f"micro-batches ({batch}), fewer than --pipeline-model-parallel-size {pp} (megatron-core "
                    f"refuses the bubble); choose a group size that divides {nmb}")
    if t.train_samples is not None:
        t.train_iters = t.train_samples // t.global_batch_size  # Megatron-LM: the last partial batch is dropped
        require(t.train_iters > 0, f"--train-samples {t.train_samples} is less than one global batch "
                                   f"({t.global_batch_size})")
    else:
        if o.lr_decay_iters is None:
            o.lr_decay_iters = t.train_iters
        if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None:
            o.lr_wsd_decay_iters = max(1, int(0.1 * o.lr_decay_iters))
    steps = lr_schedule_steps(cfg)
    require(steps["decay"] > 0, f"the LR decay span is {steps['decay']:g} iterations; it must be positive")
    require(steps["warmup"] < steps["decay"],  # megatron-core's OptimizerParamScheduler asserts it
            f"the LR warmup ({steps['warmup']:g} iterations) must be shorter than the decay span "
            f"({steps['decay']:g}: --lr-decay-iters, else --train-iters); shorten --lr-warmup-iters")
    if not cfg.data.mock_data and not cfg.data.data_path and cfg.data.tokenizer_type == "NullTokenizer" \
            and not any([cfg.data.train_data_path, cfg.data.valid_data_path, cfg.data.test_data_path]):
        raise UserError("--tokenizer-type NullTokenizer needs --data-path or --mock-data")
    from megatron_staged.subnet.schedule import validate_subnet

    validate_subnet(cfg, world_size)


# ==== Megatron-LM compatibility: flags that are not fields of the tree ===========================
#
# Every flag of Megatron-LM's pretraining parser (megatron_lm_flags.txt, generated from
# megatron/training/arguments.py at core_v0.16.1) parses here. A flag that is a field of the tree
# above means what it means in Megatron-LM. Any other Megatron flag is looked up in MEGATRON_COMPAT:
#   "set"    sets fields of the tree (another spelling of one of our flags);
#   "accept" asks for what this project always does; accepted with a one-line note;
#   "refuse" is an error naming the reason and what to use instead.
# A Megatron flag in neither place is refused with a generic line. Nothing is silently ignored.

@dataclass(frozen=True)
class CompatRule:
    action: str                      # "set" | "accept" | "refuse"
    reason: str = ""
    sets: Optional[dict] = None      # "set": field -> value; the string "$value" is the flag's value
    accept_values: Optional[tuple] = None  # "refuse" unless the flag's value is one of these


def _set(reason="", **sets):
    return CompatRule("set", reason, sets)


def _accept(reason):
    return CompatRule("accept", reason)


def _refuse(reason, accept_values=None):
    return CompatRule("refuse", reason, accept_values=accept_values)


_NO_KERNEL = "a GPU kernel/performance switch with no effect on results; nothing to do here"
MEGATRON_COMPAT: dict[str, CompatRule] = {
    # --- another spelling of a field of the tree
    "--no-rope-fusion": _set(apply_rope_fusion=False),
    "--disable-gloo-process-groups": _set(enable_gloo_process_groups=False),
    "--recompute-activations": _set("Megatron-LM's older spelling of --recompute-granularity selective",
                                    recompute_granularity="selective"),
    "--override-opt_param-scheduler": _set(override_opt_param_scheduler=True),
    "--no-overlap-p2p-communication": _set(overlap_p2p_comm=False),
    "--use-rotary-position-embeddings": _set(position_embedding_type="rope"),
    "--use-dist-ckpt": _set(ckpt_format="torch_dist"),
    "--ckpt-step": _set("load iteration N of --load: --load becomes <load>/iter_000000N (the iteration's "
                        "directory, which --load also takes directly)"),
    "--muon-no-split-qkv": _set(muon_split_qkv=False),
    "--persistent-save-interval": _set(save_interval="$value"),
    "--disable-log-loss-scale-to-tensorboard": _set(log_loss_scale_to_tensorboard=False),
    # --- what this project always does
    "--use-mcore-models": _accept("models here are always megatron-core GPTModels"),
    "--use-legacy-models": _refuse("Megatron-LM's legacy models are not part of megatron-core; drop the flag "
                                   "(megatron-core GPTModel is used)"),
    "--use-flash-attn": _accept("on GPU Transformer Engine picks flash attention when it can; CPU runs use "
                                "megatron's DotProductAttention"),
    "--attention-backend": _refuse("--attention-backend: only auto and local select anything here (TE picks "
                                   "flash/fused itself on GPU; CPU uses the local attention); use auto or local",
                                   accept_values=("auto", "local", "flash", "fused", "unfused")),
    "--no-persist-layer-norm": _accept("the persistent LayerNorm kernel is never used here"),
    "--no-create-attention-mask-in-dataloader": _accept("the data loader never builds an attention mask here "
                                                        "(megatron-core's causal attention makes its own)"),
    "--no-mmap-bin-files": _accept("how .bin files are read does not change the data"),
    "--mmap-bin-files": _accept("how .bin files are read does not change the data"),
    "--manual-gc": _accept("Python garbage-collection timing; " + _NO_KERNEL),
    "--manual-gc-interval": _accept("Python garbage-collection timing; " + _NO_KERNEL),
    "--empty-unused-memory-level": _accept("CUDA cache emptying; " + _NO_KERNEL),
    "--cross-entropy-loss-fusion": _accept("fused cross entropy; " + _NO_KERNEL),
    "--cross-entropy-fusion-impl": _accept("fused cross entropy; " + _NO_KERNEL),
    "--no-bias-dropout-add-fusion": _set(bias_dropout_fusion=False),
    "--no-gradient-reduce-div-fusion": _accept(_NO_KERNEL),
    "--use-checkpoint-args": _accept("with --load, the architecture always comes from the checkpoint's args "
                                     "here; a flag that contradicts it is an error rather than overridden"),
    "--use-cpu-initialization": _accept("weights are always initialised on CPU from global indices here "
                                        "(the same model at any layout)"),
    "--context-parallel-size": _refuse("context parallelism needs Transformer Engine's attention (CUDA) and "
                                       "the growth engine does not split sequences; use "
                                       "--context-parallel-size 1", accept_values=("1",)),
    "--dist-ckpt-strictness": _accept("checkpoints load here with Megatron-LM's default, assume_ok_unexpected, "
                                      "whatever the value: extra tensors in the checkpoint are ignored and a tensor "
                                      "the model needs but the checkpoint lacks is an error (never logged and "
                                      "skipped)"),
    "--rerun-mode": _refuse("the rerun state machine (re-running an iteration to tell a transient fault from a "
                            "real NaN/spike) is not wired; non-finite steps follow --on-non-finite (stop or "
                            "skip); use --rerun-mode disabled or drop the flag", accept_values=("disabled",)),
    "--no-ckpt-fully-parallel-save": _accept("how the save is spread over ranks; the checkpoint's content is "
                                             "the same (saves here are fully parallel)"),
    "--auto-detect-ckpt-format": _accept("only torch_dist is read here; a checkpoint in another format is an "
                                         "error naming it"),
    "--timing-log-option": _accept("the log line always reports the iteration time; per-phase timers are not "
                                   "collected"),
    "--ckpt-fully-parallel-save": _accept("torch_dist saves are fully parallel here"),
    "--ckpt-fully-parallel-load": _accept("torch_dist loads read each rank's shards directly"),
    "--dist-ckpt-optim-fully-reshardable": _accept("the distributed optimizer is always saved fully_reshardable "
                                                   "here (moments shaped like their parameters; loads at any "
                                                   "TP/PP/DP)"),
    "--ckpt-assume-constant-structure": _accept("a save-plan caching switch; each save here is complete"),
    "--num-dataset-builder-threads": _accept("threads building dataset indices: speed only, the indices are the "
                                             "same; nothing to do here"),
    "--dataloader-type": _refuse("the data order is Megatron-LM's default 'single' pretraining sampler (resumable "
                                 "at any sample); drop the flag", accept_values=("single",)),
    "--log-progress": _refuse("progress.txt is not written; the JSON-lines --log-file records iteration, "
                              "samples and FLOPs so far"),
    "--timing-log-level": _accept("the log line always reports the iteration time; per-phase timers are "
                                  "not collected", ) ,
    "--reset-attention-mask": _refuse("per-document attention masks are not supported (attention is causal over "
                                      "the whole sequence); --reset-position-ids and --eod-mask-loss are; drop it"),
    "--profile": _refuse("use the PyTorch profiler around `megatron-staged train`; --profile is not wired"),
    # --- refused, with what to do instead
    "--rampup-batch-size": _refuse(
        "batch-size ramp-up is not supported: growth stages, FLOPs and the LR re-warmup count iterations "
        "of a constant global batch; use a constant --global-batch-size (Megatron-LM itself allows the "
        "ramp only with --train-samples)"),
    "--apply-layernorm-1p": _refuse(
        "zero-centred norm gamma is not supported: megatron-core's local (CPU) norms lack it and the "
        "growth operators and HF export assume plain gamma; drop the flag"),
    "--async-save": _refuse("checkpoints are saved synchronously and atomically here; drop --async-save"),
    "--no-save-rng": _refuse("RNG state is always saved (exact resume needs it); drop the flag and use "
                             "--no-load-rng when resuming"),
    "--ckpt-format": None,  # a field; values other than torch_dist are refused in validate_megatron
    "--decoupled-lr": _refuse("a separate LR for the embedding and output layer is not supported; drop "
                              "--decoupled-lr/--decoupled-min-lr"),
    "--decoupled-min-lr": _refuse("a separate LR for the embedding and output layer is not supported; drop "
                                  "--decoupled-lr/--decoupled-min-lr"),
    "--grad-reduce-in-bf16": _refuse("gradients are reduced in fp32 here; drop --grad-reduce-in-bf16"),
    "--calculate-per-token-loss": _refuse("the loss is the mean over each micro-batch's tokens, averaged "
                                          "over micro-batches (Megatron's default); drop the flag"),
    "--fp8-format": _refuse("FP8 training is not wired (needs Transformer Engine FP8 recipes); drop the "
                            "--fp8-* flags and use --bf16"),
    "--fp8-amax-history-len": _refuse("FP8 training is not wired; drop the --fp8-* flags and use --bf16"),
    "--fp8-amax-compute-algo": _refuse("FP8 training is not wired; drop the --fp8-* flags and use --bf16"),
    "--fp8-param-gather": _refuse("FP8 training is not wired; drop the --fp8-* flags and use --bf16"),
    "--fp8-recipe": _refuse("FP8 training is not wired; drop the --fp8-* flags and use --bf16"),
    "--vocab-extra-ids": _refuse("extra T5 sentinel ids are not supported (GPT pretraining only); drop it",
                                 accept_values=("0",)),
    "--legacy-tokenizer": _accept("the tokenizers here follow Megatron-LM's legacy tokenizer classes"),
    "--num-experts": _refuse("mixture-of-experts models are not supported (dense GPT/Llama only)"),
    "--tokenizer-special-tokens": _refuse("custom special tokens are not supported; put them in the "
                                          "tokenizer files"),
}
MEGATRON_COMPAT = {k: v for k, v in MEGATRON_COMPAT.items() if v is not None}

# Megatron-LM values of a field that this project spells differently: field -> value -> (ours, why)
_TE_PICKS = "on GPU Transformer Engine (or torch SDPA) picks flash/fused itself; CPU runs use megatron's attention"
MEGATRON_VALUES: dict[str, dict[str, tuple]] = {
    "attention_backend": {"flash": ("auto", _TE_PICKS), "fused": ("auto", _TE_PICKS),
                          "unfused": ("local", "megatron's unfused DotProductAttention")},
}


def _extend_choices(parser: argparse.ArgumentParser) -> None:
    for name, values in MEGATRON_VALUES.items():
        action = parser._option_string_actions.get("--" + name.replace("_", "-"))
        if action is not None and action.choices is not None:
            action.choices = list(action.choices) + [v for v in values if v not in action.choices]


def megatron_lm_flags() -> dict[str, tuple[str, str]]:
    """Megatron-LM's pretraining flags: name -> (number of values, argument group)."""
    import os

    path = os.path.join(os.path.dirname(__file__), "megatron_lm_flags.txt")
    out = {}
    with open(path) as fh:
        for line in fh:
            if line.strip() and not line.startswith("#"):
                name, nargs, group = line.split()
                out[name] = (nargs, group.replace("_", " "))
    return out


class _RecordMegatronFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        got = getattr(namespace, "_megatron_flags", None) or []
        vals = values if isinstance(values, list) else ([] if values is None else [values])
        got.append((option_string, [str(v) for v in vals]))
        setattr(namespace, "_megatron_flags", got)


def add_megatron_compat_flags(parser: argparse.ArgumentParser) -> None:
    """Register every Megatron-LM flag that is not a field, so it parses (values consumed) and
    is then set, accepted or refused by :func:`apply_megatron_compat`."""
    _extend_choices(parser)
    known = parser._option_string_actions
    flags = megatron_lm_flags()
    for name in sorted(set(flags) | set(MEGATRON_COMPAT)):
        if name in known:
            continue  # a field of the tree: means what it means in Megatron-LM
        nargs = flags.get(name, ("0", ""))[0]
        nargs = {"0": 0, "1": None, "*": "*", "?": "?"}.get(nargs, int(nargs) if nargs.isdigit() else "*")
        parser.add_argument(name, nargs=nargs, action=_RecordMegatronFlag, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def _gloo_backend(backend: str) -> bool:
    import torch

    return backend == "gloo" or (backend == "auto" and not torch.cuda.is_available())


def apply_megatron_compat(cfg: "Config", recorded: list) -> list[str]:
    """Apply the recorded Megatron flags to ``cfg``; returns notes, raises one UserError for all refusals."""
    groups = megatron_lm_flags()
    notes, refused = [], []
    for flag, values in recorded or []:
        rule = MEGATRON_COMPAT.get(flag)
        value = values[0].strip("'\"") if values else None
        if rule is None:
            group = groups.get(flag, ("", "?"))[1]
            refused.append(f"{flag} (Megatron-LM '{group}' option) is not supported by megatron_staged; "
                           "remove it (see docs/megatron_compat.md)")
        elif flag == "--ckpt-step":  # Megatron-LM: load this iteration of --load instead of the latest
            try:
                step = int(value)
            except (TypeError, ValueError):
                raise UserError(f"--ckpt-step: cannot interpret {value!r} as int") from None
            load = cfg.checkpoint.load
            require(load is not None, "--ckpt-step needs --load (the directory given to --save)")
            path = os.path.join(load, f"iter_{step:07d}")
            require(os.path.isdir(path), f"--ckpt-step {step}: no {path} (iterations saved there: "
                    + (", ".join(n[5:].lstrip("0") or "0" for n in sorted(os.listdir(load)) if n.startswith("iter_"))
                       if os.path.isdir(load) else "none, no such directory") + ")")
            cfg.checkpoint.load = path
        elif rule.action == "set":
            for key, v in rule.sets.items():
                set_value(cfg, key, value if v == "$value" else v)
            if flag == "--disable-gloo-process-groups" and _gloo_backend(cfg.parallel.distributed_backend):
                notes.append(f"{flag}: megatron-core's extra gloo process groups are not created; this run's "
                             "backend is gloo itself (CPU), so its communication still runs on gloo")
        elif rule.action == "accept":
            if rule.reason:
                notes.append(f"{flag} accepted: {rule.reason}")
        elif rule.accept_values is not None and value in rule.accept_values:
            if flag == "--attention-backend" and value in ("flash", "fused", "unfused"):
                notes.append(f"{flag} {value} accepted: Transformer Engine chooses among flash/fused/unfused "
                             "itself on GPU; CPU runs use megatron's DotProductAttention")
            elif flag == "--attention-backend" and value == "local":
                set_value(cfg, "transformer_impl", "local")
        else:
            refused.append(f"{flag}{''.join(' ' + v for v in values)}: {rule.reason}")
    if refused:
        raise UserError("; ".join(refused))
    return notes


def validate_megatron(cfg: "Config", world_size: int) -> None:
    """Megatron-LM's rules for the compatibility fields (called from validate, before batch math)."""
    t, o, d, c = cfg.training, cfg.optim, cfg.data, cfg.checkpoint
    explicit = getattr(cfg, "_explicit", set())
    require(c.ckpt_format == "torch_dist",
            f"--ckpt-format {c.ckpt_format}: only torch_dist (megatron-core dist_checkpointing, Megatron-LM's "
            "default) is supported; convert with Megatron-LM's tools/checkpoint/convert.py first")
    if t.train_samples is not None:
        require("train_iters" not in explicit,
                "--train-samples and --train-iters are exclusive (sample- or iteration-based training, as "
                "in Megatron-LM); drop one")
        require(o.lr_decay_iters is None and "lr_decay_iters" not in explicit and o.lr_warmup_iters == 0,
                "with --train-samples give the LR schedule in samples: --lr-decay-samples, "
                "--lr-warmup-samples (or --lr-warmup-fraction), not --lr-decay-iters/--lr-warmup-iters")
        require(o.lr_wsd_decay_iters is None or "lr_wsd_decay_iters" not in explicit,
                "with --train-samples use --lr-wsd-decay-samples, not --lr-wsd-decay-iters")
        require(t.train_samples > 0, "--train-samples must be positive")
    else:
        require(o.lr_decay_samples is None and o.lr_warmup_samples == 0 and o.lr_wsd_decay_samples is None,
                "--lr-decay-samples/--lr-warmup-samples/--lr-wsd-decay-samples need sample-based training "
                "(--train-samples); with --train-iters use --lr-decay-iters/--lr-warmup-iters")
    if o.lr_warmup_fraction is not None:
        require(o.lr_warmup_iters == 0 and o.lr_warmup_samples == 0,
                "give one of --lr-warmup-fraction, --lr-warmup-iters and --lr-warmup-samples")
        require(0.0 <= o.lr_warmup_fraction < 1.0, "--lr-warmup-fraction must be in [0, 1)")
    require(d.builtin_corpus_max_bytes > 0, "--builtin-corpus-max-bytes must be positive")
    read_data_args_files(d)
    if o.weight_decay_incr_style == "constant":  # Megatron-LM's rule
        require(o.start_weight_decay is None and o.end_weight_decay is None,
                "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style linear or cosine")
    else:
        require(o.start_weight_decay is not None and o.end_weight_decay is not None,
                f"--weight-decay-incr-style {o.weight_decay_incr_style} needs --start-weight-decay and "
                f"--end-weight-decay")
        require(0 <= o.start_weight_decay <= o.end_weight_decay,  # megatron-core's scheduler asserts it
                f"--start-weight-decay {o.start_weight_decay} must be non-negative and not above "
                f"--end-weight-decay {o.end_weight_decay}")
    require(not d.builtin_corpus or not (d.data_path or d.mock_data),
            "--builtin-corpus is its own data source; drop --data-path/--mock-data")
    require(not (any([d.train_data_path, d.valid_data_path, d.test_data_path]) and d.data_path),
            "give either --data-path (with --split) or --train-data-path/--valid-data-path/--test-data-path")
    if cfg.logging.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb-project needs the wandb package (pip install wandb); drop the "
                            "--wandb-* flags or install it") from None
    if c.exit_on_missing_checkpoint:
        import os

        require(c.load is not None, "--exit-on-missing-checkpoint needs --load")
        has = os.path.isfile(os.path.join(c.load, "latest_checkpointed_iteration.txt")) or (
            os.path.isdir(c.load) and any(n.startswith("iter_") for n in os.listdir(c.load)))
        require(has, f"--load {c.load}: no checkpoint there (no latest_checkpointed_iteration.txt) and "
                     "--exit-on-missing-checkpoint is set")


def read_data_args_files(d: "DataConfig") -> None:
    """Megatron-LM's --data-args-path (the --data-path blend in a file) and --per-split-data-args-path
    (a JSON object of per-split blends): read into the blend fields once, then cleared."""
    import json
    import os

    if d.data_args_path is not None:
        require(not d.data_path and not d.per_split_data_args_path,
                "--data-args-path replaces --data-path (and --per-split-data-args-path); give one")
        require(os.path.isfile(d.data_args_path), f"--data-args-path {d.data_args_path}: no such file")
        with open(d.data_args_path) as f:
            d.data_path = f.read().split()
        require(d.data_path, f"--data-args-path {d.data_args_path}: the file is empty")
        d.data_args_path = None
    if d.per_split_data_args_path is not None:
        p = d.per_split_data_args_path
        require(not d.data_path and not any([d.train_data_path, d.valid_data_path, d.test_data_path]),
                "--per-split-data-args-path replaces --data-path and --train/valid/test-data-path; give one")
        require(os.path.isfile(p), f"--per-split-data-args-path {p}: no such file")
        try:
            with open(p) as f:
                splits = json.load(f)
        except ValueError as e:
            raise UserError(f"--per-split-data-args-path {p}: not JSON ({e})") from None
        require(isinstance(splits, dict) and set(splits) <= {"train", "valid", "test"} and splits,
                f"--per-split-data-args-path {p}: expected an object with keys train, valid, test")
        for name, blend in splits.items():
            if isinstance(blend, str):
                blend = blend.split()
            require(isinstance(blend, list) and all(isinstance(x, (str, int, float)) for x in blend),
                    f"--per-split-data-args-path {p}: {name} must be a list of weights and prefixes")
            setattr(d, f"{name}_data_path", [str(x) for x in blend])
        d.per_split_data_args_path = None


def require_data_source(d: "DataConfig") -> None:
    """As Megatron-LM: training needs data flags (checked when the data is built, not for planning)."""
    if not (d.data_path or d.mock_data or d.builtin_corpus or d.train_data_path or d.valid_data_path
            or d.test_data_path):
        raise UserError("no training data: give --data-path PREFIX (from tools/preprocess_data.py), "
                        "--train-data-path/--valid-data-path, --mock-data, or --builtin-corpus")


def lr_schedule_steps(cfg: "Config") -> dict:
    """Warmup, decay and WSD-decay lengths in iterations (floats), as Megatron-LM computes them.

    Megatron-LM's scheduler counts samples (iterations x global batch); with a constant global
    batch that is the same schedule in iterations, so sample counts are divided by the batch.
    """
    t, o = cfg.training, cfg.optim
    gbs = t.global_batch_size
    if t.train_samples is not None:
        decay = (o.lr_decay_samples or t.train_samples) / gbs
        warmup = o.lr_warmup_samples / gbs
        wsd = o.lr_wsd_decay_samples / gbs if o.lr_wsd_decay_samples is not None else None
    else:
        decay = o.lr_decay_iters or t.train_iters
        warmup = o.lr_warmup_iters
        wsd = o.lr_wsd_decay_iters
    if o.lr_warmup_fraction is not None:
        warmup = o.lr_warmup_fraction * decay
    if o.lr_decay_style == "WSD" and wsd is None:
        wsd = max(1, int(0.1 * decay))
    return {"warmup": warmup, "decay": decay, "wsd_decay": wsd}
