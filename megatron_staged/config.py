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
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

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
    normalization: Optional[str] = _f(None, "LayerNorm or RMSNorm", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _f(1e-5)
    untie_embeddings_and_output_weights: Optional[bool] = _f(None)
    disable_bias_linear: Optional[bool] = _f(None)
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


@dataclass
class TrainingConfig:
    micro_batch_size: int = _f(1)
    global_batch_size: Optional[int] = _f(None, "default micro_batch_size * data-parallel size")
    train_iters: int = _f(100)
    seed: int = _f(1234)
    eval_interval: int = _f(0, "0 disables evaluation during training")
    eval_iters: int = _f(10)
    log_interval: int = _f(10)
    exit_interval: Optional[int] = _f(None, "save and stop when the iteration is a multiple of this")
    exit_duration_in_mins: Optional[float] = _f(None, "save and stop once the job has run this many minutes")
    exit_signal_handler: bool = _f(False, "on SIGTERM (what schedulers send before a kill): save and exit 0")
    on_non_finite: str = _f("stop", "non-finite loss or gradients: stop (save the last good state, exit 2) or "
                            "skip the step", choices=["stop", "skip"])
    max_consecutive_skipped_iterations: int = _f(10, "with --on-non-finite skip: stop after this many in a row")
    progress_bar: str = _f("auto", "auto: on rank 0 when stdout is a terminal", choices=["auto", "on", "off"])


@dataclass
class OptimizerConfig:
    optimizer: str = _f("adam", choices=["adam", "sgd"])
    lr: float = _f(3e-4)
    min_lr: float = _f(0.0)
    lr_decay_style: str = _f("cosine", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_warmup_iters: int = _f(0)
    lr_warmup_init: float = _f(0.0)
    lr_decay_iters: Optional[int] = _f(None, "default train_iters")
    lr_wsd_decay_style: str = _f("exponential", choices=["exponential", "linear", "cosine", "minus_sqrt"])
    lr_wsd_decay_iters: Optional[int] = _f(None)
    weight_decay: float = _f(0.01)
    clip_grad: float = _f(1.0)
    adam_beta1: float = _f(0.9)
    adam_beta2: float = _f(0.999)
    adam_eps: float = _f(1e-8)
    sgd_momentum: float = _f(0.9)
    # fp16 loss scaling, Megatron-LM's flags (bf16 needs none)
    loss_scale: Optional[float] = _f(None, "fp16: a constant loss scale; default dynamic scaling")
    initial_loss_scale: float = _f(2.0 ** 32, "fp16 dynamic scaling: the first scale")
    min_loss_scale: float = _f(1.0, "fp16 dynamic scaling: the scale never drops below this")
    loss_scale_window: int = _f(1000, "fp16 dynamic scaling: iterations without overflow before doubling")
    hysteresis: int = _f(2, "fp16 dynamic scaling: overflows tolerated before halving")


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


@dataclass
class DataConfig:
    data_path: list = _lf("blend: PREFIX | PREFIX1 PREFIX2 | W1 PREFIX1 W2 PREFIX2; none -> built-in corpus")
    split: str = _f("969,30,1")
    mock_data: bool = _f(False)
    tokenizer_type: Optional[str] = _f(None, choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = _f(None)
    data_cache_path: Optional[str] = _f(None)
    num_workers: int = _f(0)
    default_corpus_dir: Optional[str] = _f(None, "cache for the built-in corpus (default ~/.cache/megatron_staged)")


@dataclass
class CheckpointConfig:
    save: Optional[str] = _f(None)
    load: Optional[str] = _f(None)
    save_interval: Optional[int] = _f(None)
    no_save_optim: bool = _f(False)
    no_load_optim: bool = _f(False)
    no_load_rng: bool = _f(False)
    finetune: bool = _f(False, "load weights only; reset iteration, optimizer and data position")
    ckpt_format: str = _f("torch_dist", choices=["torch_dist"])
    override_opt_param_scheduler: bool = _f(False, "on --load, take the LR schedule from the flags, not the checkpoint")
    use_checkpoint_opt_param_scheduler: bool = _f(
        False, "on --load, take the LR schedule from the checkpoint (the default here) without a note when "
        "the flags differ", aliases=["--use-checkpoint-opt_param-scheduler"])
    ckpt_fallback_to_intact: bool = _f(False, "on --load, if the latest checkpoint is damaged, resume from the "
                                       "newest intact iteration (with a warning) instead of stopping")


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = _f(None)
    log_file: Optional[str] = _f(None, "also append per-iteration JSON records here (rank 0)")


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
        raise UserError(f"unknown config key '{name}'; see `megatron-staged train --help` for the flags")
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
    for sec in SECTIONS:
        group = parser.add_argument_group(sec)
        for name, (s, f) in FIELDS.items():
            if s != sec or name == "stages":
                continue
            add_field_flag(group, name, f)


def config_from_args(ns: argparse.Namespace, base: Optional[Config] = None) -> Config:
    cfg = base.copy() if base is not None else Config()
    explicit: set[str] = set()
    if getattr(ns, "config", None):
        d = load_yaml(ns.config)
        apply_mapping(cfg, d, source=f"--config {ns.config}")
        explicit |= _flat_keys(d)
    for name in FIELDS:
        if hasattr(ns, name):
            set_value(cfg, name, getattr(ns, name))
            explicit.add(name)
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
    for k, v in _PRESETS[m.model_family].items():
        if getattr(m, k) is None:
            setattr(m, k, v)
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.ffn_hidden_size is None:
        if m.swiglu:
            # LLaMA: 2/3 of 4h, rounded up to a multiple of 64 (keeps TP splits even)
            m.ffn_hidden_size = int(math.ceil(int(8 * m.hidden_size / 3) / 64) * 64)
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


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Pad the vocabulary so it splits evenly over TP ranks.

    Megatron pads to a multiple of ``divisible_by * TP``, which makes the padded size, and so the
    softmax over padded logits, depend on the layout. We pad to a multiple of
    ``lcm(divisible_by, TP)`` instead: with the default 128 the padded size is the same for every
    TP up to 128, so the same seed gives the same model at any layout and checkpoints reshard.
    """
    multiple = math.lcm(divisible_by, tp)
    return int(math.ceil(vocab_size / multiple) * multiple)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_split(split: str) -> list[float]:
    """Megatron's ``--split 969,30,1`` (or ``98/2/0``): up to three non-negative weights, positive sum."""
    parts = str(split).replace("/", ",").split(",")
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
                  "rotary_base", "norm_epsilon"],
        "parallel": ["tensor_model_parallel_size", "pipeline_model_parallel_size", "distributed_timeout_minutes"],
        "training": ["micro_batch_size", "global_batch_size", "train_iters", "eval_iters", "log_interval",
                     "exit_interval", "exit_duration_in_mins", "max_consecutive_skipped_iterations"],
        "optim": ["lr", "lr_decay_iters", "lr_wsd_decay_iters", "adam_eps"],
        "checkpoint": ["save_interval"],
    }
    non_negative = {
        "model": ["num_layers", "init_method_std", "hidden_dropout", "attention_dropout"],
        "training": ["seed", "eval_interval"],
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
    parse_split(cfg.data.split)


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
    require(m.num_layers % pp == 0,
            f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}; "
            f"use a PP size that divides the layer count")
    require(m.num_layers > 0 or pp == 1, "a zero-layer model cannot be pipelined; use --pipeline-model-parallel-size 1")
    require(m.max_position_embeddings >= m.seq_length or m.position_embedding_type == "rope",
            f"--max-position-embeddings {m.max_position_embeddings} < --seq-length {m.seq_length}")
    require(not (m.bf16 and m.fp16), "choose one of --bf16 and --fp16")
    validate_performance(cfg)
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
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters
    if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None:
        o.lr_wsd_decay_iters = max(1, int(0.1 * o.lr_decay_iters))
    require(o.lr_warmup_iters <= o.lr_decay_iters or o.lr_decay_style == "constant",
            f"--lr-warmup-iters {o.lr_warmup_iters} exceeds --lr-decay-iters {o.lr_decay_iters}")
    if not cfg.data.mock_data and not cfg.data.data_path and cfg.data.tokenizer_type == "NullTokenizer":
        raise UserError("--tokenizer-type NullTokenizer needs --data-path or --mock-data")
    from megatron_staged.subnet.schedule import validate_subnet

    validate_subnet(cfg, world_size)
