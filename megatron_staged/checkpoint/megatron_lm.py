"""Megatron-LM's checkpoint conventions, both ways (Megatron-LM ``core_v0.16.1``, ``checkpointing.py``).

Both projects write megatron-core torch_dist checkpoints of the same ``GPTModel``, so the sharded
tensors of the model already agree key for key. What differs is the non-sharded part, ``common.pt``:

=============================  ===========================================  =================================
entry                          Megatron-LM writes                           this project
=============================  ===========================================  =================================
``args``                       ``argparse.Namespace`` of its ~650 flags     the same kind of Namespace (its
                                                                            check_checkpoint_args reads
                                                                            attributes), built by
                                                                            :func:`megatron_lm_args`
``megatron_staged_config``     --                                           this project's config tree (dict)
``opt_param_scheduler``        steps counted in **samples**                 the same (iterations x global batch)
``rng_state`` (sharded)        ``[per-DP-rank dict]`` over (PP, TP),         the same
                               replicated over DP
``content_metadata``           the optimizer's sharding type                the same (``fully_reshardable``)
``train_state``                --                                           step, stage history, loss history
=============================  ===========================================  =================================

Checkpoints written here before this format hold ``args`` as the config dict, the scheduler in
iterations and a (PP, TP, DP) RNG object; :func:`checkpoint_config` and the loader read all three.
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

CONFIG_KEY = "megatron_staged_config"
SCHEDULER_STEP_KEYS = ("lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps")
# Sections of our config a Megatron-LM checkpoint's args can describe (paths to save, logging, staging
# and subnet options belong to the new run, not to the checkpoint).
_IMPORTED_SECTIONS = ("model", "parallel", "training", "optim", "data", "performance")


def is_megatron_lm(common: dict) -> bool:
    """Saved by Megatron-LM itself (its ``args`` Namespace and no config tree of ours)."""
    return isinstance(common.get("args"), argparse.Namespace) and CONFIG_KEY not in common


def normalize_common(raw: dict) -> dict:
    """``common.pt`` as this project reads it, whoever wrote it: ``args`` = the config tree (dict),
    ``megatron_lm_args`` = Megatron-LM's Namespace (when there is one), ``train_state``,
    ``parallel_layout``, and ``opt_param_scheduler`` counted in iterations; ``saved_by`` names the writer."""
    common = dict(raw)
    args = raw.get("args")
    if not isinstance(args, argparse.Namespace):  # ours, before the Megatron-LM-compatible format
        common["saved_by"] = "megatron_staged"
        return common
    gbs = int(getattr(args, "global_batch_size", 1) or 1)
    common["megatron_lm_args"] = args
    common["args"] = checkpoint_config(raw)
    if raw.get("opt_param_scheduler") is not None:
        common["opt_param_scheduler"] = scheduler_in_iterations(raw["opt_param_scheduler"], gbs)
    if CONFIG_KEY in raw:
        common["saved_by"] = "megatron_staged"
        return common
    common["saved_by"] = "Megatron-LM"
    it = int(raw.get("iteration", 0))
    common["train_state"] = {
        "iteration": it, "consumed_train_samples": int(getattr(args, "consumed_train_samples", 0) or 0),
        "flops_so_far": float(raw.get("num_floating_point_operations_so_far", 0.0) or 0.0),
        "optimizer_step": it,  # Adam's step count = iterations (fp32/bf16 skip none)
        "has_optimizer": not getattr(args, "no_save_optim", False) and "optimizer" in raw}
    common["parallel_layout"] = {"tp": int(getattr(args, "tensor_model_parallel_size", 1)),
                                 "pp": int(getattr(args, "pipeline_model_parallel_size", 1)),
                                 "dp": int(getattr(args, "data_parallel_size", 1))}
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        common["parallel_layout"]["vp"] = int(args.virtual_pipeline_model_parallel_size)
    return common


def checkpoint_config(common: dict) -> Optional[dict]:
    """The config tree (a dict, ``Config.from_dict``-able) a checkpoint was saved with, or None.

    Ours: ``megatron_staged_config`` (or ``args`` itself in checkpoints saved before the
    Megatron-LM-compatible format); Megatron-LM's: translated from its ``args`` Namespace.
    """
    if isinstance(common.get(CONFIG_KEY), dict):
        return common[CONFIG_KEY]
    args = common.get("args")
    if isinstance(args, dict):
        return args or None
    if isinstance(args, argparse.Namespace):
        return config_from_megatron_args(args).to_dict()
    return None


def _name(v) -> Any:
    return getattr(v, "name", v)  # a megatron-core enum (AttnBackend.unfused) -> its name


def config_from_megatron_args(ns: argparse.Namespace):
    """This project's ``Config`` for a Megatron-LM ``args`` Namespace (same flag names, same meaning).

    Values that have no counterpart here (or a value outside this project's choices) are left at
    the default; architecture fields always have one, so the model built is Megatron-LM's.
    """
    from megatron_staged.config import FIELDS, Config, set_value
    from megatron_staged.errors import UserError

    cfg = Config()
    v = vars(ns)
    for name, (sec, _) in FIELDS.items():
        if sec not in _IMPORTED_SECTIONS or name not in v or v[name] is None:
            continue
        try:
            set_value(cfg, name, _name(v[name]))
        except UserError:
            pass  # e.g. --transformer-impl inference_optimized, a position type this project lacks
    m = cfg.model
    m.model_family = "llama" if v.get("normalization") == "RMSNorm" else "gpt2"
    m.disable_bias_linear = not v.get("add_bias_linear", True)
    m.untie_embeddings_and_output_weights = bool(v.get("untie_embeddings_and_output_weights", False))
    m.swiglu = bool(v.get("swiglu", False))
    m.normalization = v.get("normalization") or "LayerNorm"
    m.position_embedding_type = v.get("position_embedding_type") or "learned_absolute"
    m.group_query_attention = bool(v.get("group_query_attention", False))
    backend = str(_name(v.get("attention_backend") or "auto"))
    cfg.performance.attention_backend = "local" if backend in ("unfused", "local") else "auto"
    if v.get("transformer_impl") not in ("transformer_engine", "local"):
        m.transformer_impl = "auto"
    if cfg.optim.weight_decay_incr_style == "constant":
        # Megatron-LM's validate_args fills start/end weight decay with --weight-decay for a constant style
        cfg.optim.start_weight_decay = cfg.optim.end_weight_decay = None
    if not v.get("eval_iters"):  # Megatron-LM: --eval-iters 0 runs no evaluation; here that is --eval-interval 0
        cfg.training.eval_interval, cfg.training.eval_iters = 0, type(cfg.training)().eval_iters
    if v.get("train_iters") is None and v.get("train_samples"):
        cfg.training.train_iters = int(v["train_samples"]) // int(v["global_batch_size"])
    return cfg


def megatron_lm_args(cfg, *, tp: int, pp: int, world_size: int, iteration: int, consumed_train_samples: int,
                     has_optimizer: bool) -> argparse.Namespace:
    """Megatron-LM's ``args`` for a checkpoint saved here: every field of the (resolved) config tree
    under its Megatron-LM name, plus what Megatron-LM's ``load_checkpoint``/``check_checkpoint_args``
    and ``--use-checkpoint-args`` read under other names. Plain values only (weights-only readable)."""
    from megatron_staged.config import resolve_model, virtual_pipeline_size

    c = cfg.copy()
    m = resolve_model(c.model)
    d = {}
    for sec in _IMPORTED_SECTIONS:
        d.update(getattr(c, sec).__dict__)
    dp = world_size // (tp * pp)
    d.update(
        add_bias_linear=not m.disable_bias_linear,
        add_position_embedding=m.position_embedding_type == "learned_absolute",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp,
        world_size=world_size, context_parallel_size=1, virtual_pipeline_model_parallel_size=virtual_pipeline_size(c),
        global_batch_size=c.training.global_batch_size or c.training.micro_batch_size * dp,
        iteration=iteration, consumed_train_samples=consumed_train_samples, skipped_train_samples=0,
        consumed_valid_samples=0, use_dist_ckpt=True, ckpt_format="torch_dist", no_save_optim=not has_optimizer,
        no_save_rng=False, data_parallel_random_init=False, dist_ckpt_optim_fully_reshardable=True,
        transformer_impl=m.transformer_impl if m.transformer_impl != "auto" else "local",
        use_mcore_models=True, use_legacy_models=False,
    )
    return argparse.Namespace(**d)


def scheduler_in_samples(sd: dict, global_batch_size: int) -> dict:
    """Our scheduler state (steps = iterations) in Megatron-LM's units (steps = samples)."""
    return {k: (v * global_batch_size if k in SCHEDULER_STEP_KEYS and v is not None else v) for k, v in sd.items()}


def scheduler_in_iterations(sd: dict, global_batch_size: int) -> dict:
    """Megatron-LM's scheduler state (steps = samples) in iterations of a constant global batch."""
    def it(v):
        q = v / global_batch_size
        return int(q) if float(q).is_integer() else q
    return {k: (it(v) if k in SCHEDULER_STEP_KEYS and v is not None else v) for k, v in sd.items()}


# ---- RNG: Megatron-LM's layout ------------------------------------------------------------------

def to_megatron_rng(state: dict) -> dict:
    """``runtime.distributed.rng_state()`` under Megatron-LM's names (``get_rng_state``)."""
    import torch

    return {"random_rng_state": state["random"], "np_rng_state": state["np"], "torch_rng_state": state["torch"],
            "cuda_rng_state": state.get("cuda", torch.get_rng_state()), "rng_tracker_states": state["tracker"]}


def from_megatron_rng(state: dict) -> dict:
    import torch

    out = {"random": state["random_rng_state"], "np": state["np_rng_state"], "torch": state["torch_rng_state"],
           "tracker": state["rng_tracker_states"]}
    if torch.cuda.is_available() and state.get("cuda_rng_state") is not None:
        out["cuda"] = state["cuda_rng_state"]
    return out


def rng_layout(ckpt_dir: str) -> Optional[str]:
    """'megatron' ((PP, TP) object, list per DP rank), 'legacy' ((PP, TP, DP), ours before), or None."""
    from megatron_staged.checkpoint.global_tensors import read_metadata

    for key in read_metadata(ckpt_dir).state_dict_metadata:
        if key.startswith("rng_state/shard_"):
            offset = key[len("rng_state/shard_"):].split("_")[0]
            return "legacy" if offset.count(".") == 2 else "megatron"
    return None
