"""Grow a run: source checkpoint -> target model, optimizer, LR schedule and training state.

One code path for the offline tool (``megatron-staged grow``) and for growth inside a running job.
"""
from __future__ import annotations

import torch.distributed as dist

from megatron_staged.config import Config
from megatron_staged.growth.engine import grow_sharded_state
from megatron_staged.growth.spec import GrowthSpec, target_config
from megatron_staged.runtime.distributed import current_layout, set_parallel_layout, set_seed


def describe(cfg: Config, layout=None) -> dict:
    m, p = cfg.model, cfg.parallel
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups, "ffn_hidden_size": m.ffn_hidden_size,
            "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "dp": layout.dp if layout else None}


def grow_from_checkpoint(src_dir: str, spec: GrowthSpec, old_cfg: Config, common: dict, new_cfg: Config = None):
    """Build the grown components at the target layout and fill them from ``src_dir``.

    Returns (new_cfg, model_chunks, optimizer, scheduler, train_state, stats). Collective.
    """
    from megatron_staged.checkpoint.manager import set_optimizer_step
    from megatron_staged.training.trainer import build_model_chunks, build_optimizer, wire_schedule_hooks
    from megatron_staged.training.lr import build_scheduler

    world = dist.get_world_size()
    if new_cfg is None:
        new_cfg = target_config(old_cfg, spec, world)
    old_layout = common.get("parallel_layout", {})
    layout = set_parallel_layout(new_cfg.parallel.tensor_model_parallel_size,
                                 new_cfg.parallel.pipeline_model_parallel_size)
    set_seed(new_cfg.training.seed)
    fresh = any(src is None for src in spec.depth_map) or (spec.depth_init == "random" and any(spec.new_layer))
    model = build_model_chunks(new_cfg, initialize=fresh)  # else every tensor comes from the source
    optimizer = build_optimizer(new_cfg, model)
    scheduler = build_scheduler(optimizer, new_cfg.optim, new_cfg.training.train_iters)
    wire_schedule_hooks(model, optimizer, new_cfg)
    stats = grow_sharded_state(src_dir, spec, old_cfg.model, model, optimizer)

    state = dict(common.get("train_state", {}))
    set_optimizer_step(optimizer, state.get("optimizer_step", 0))
    s_pre = int(common.get("opt_param_scheduler", {}).get("num_steps", state.get("iteration", 0)))
    rho = spec.effective_rho()
    s_target = int(round(s_pre / rho))
    scheduler.jump_to(s_target, spec.rewarmup_iters)
    entry = {
        "iteration": int(common.get("iteration", 0)),
        "consumed_samples": int(state.get("consumed_train_samples", 0)),
        "flops_so_far": float(state.get("flops_so_far", 0.0)),
        "operator": ("depth" if spec.grows_depth else "") + ("+" if spec.grows_depth and spec.width_factor > 1 else "")
                    + ("width" if spec.width_factor > 1 else ""),
        "from": dict(describe(old_cfg), **{k: old_layout.get(k) for k in ("tp", "pp", "dp")}),
        "to": describe(new_cfg, layout),
        "rho": rho, "schedule_step_before": s_pre, "schedule_step_after": s_target,
        "rewarmup_iters": spec.rewarmup_iters, "spec": spec.to_dict(),
    }
    state["stage_history"] = list(state.get("stage_history", [])) + [entry]
    state["iteration"] = int(common.get("iteration", 0))
    return new_cfg, model, optimizer, scheduler, state, stats
