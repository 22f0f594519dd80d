"""Grow a run: source state (a checkpoint or the live shards) -> target components (model, optimizer, LR schedule) and state.

One code path for the offline tool (``megatron-staged grow``) and for growth inside a running job.
"""
from __future__ import annotations

import torch.distributed as dist

from megatron_staged.builders import Components, build_components
from megatron_staged.config import Config, virtual_pipeline_size
from megatron_staged.growth.engine import grow_sharded_state
from megatron_staged.growth.operators import FRESH_INITS
from megatron_staged.growth.spec import GrowthSpec, target_config
from megatron_staged.training.state import TrainState


def describe(cfg: Config, layout=None) -> dict:
    m, p = cfg.model, cfg.parallel
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups, "ffn_hidden_size": m.ffn_hidden_size,
            "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "vp": virtual_pipeline_size(cfg),
            "dp": layout.dp if layout else None}


def operator_name(spec: GrowthSpec) -> str:
    return "+".join(n for n, on in (("depth", spec.grows_depth), ("width", spec.width_factor > 1)) if on)


def needs_fresh_init(spec: GrowthSpec) -> bool:
    """Does any target tensor keep the target model's own init (a fresh or random layer)?"""
    return any(src is None for src in spec.depth_map) or (spec.depth_init in FRESH_INITS and any(spec.new_layer))


def grow_from_checkpoint(src_dir: str, spec: GrowthSpec, old_cfg: Config, common: dict,
                         new_cfg: Config = None) -> tuple[Components, TrainState, dict]:
    """Offline growth: the source is the torch_dist checkpoint ``src_dir`` (see :func:`grow`)."""
    from megatron_staged.growth.sources import CheckpointSource

    return grow(CheckpointSource(src_dir), spec, old_cfg, common, new_cfg)


def group_key(group: dict) -> tuple:
    """What tells an optimizer param group from the others (its kind, not its parameters)."""
    return tuple(group.get(k) for k in ("wd_mult", "lr_mult", "is_decoupled_lr", "is_expert_parallel"))


def group_lrs(optimizer) -> list:
    """(group kind, max_lr, min_lr) of each param group: what a resumed run took from its checkpoint."""
    groups = getattr(optimizer, "param_groups", None) or []
    return [(list(group_key(g)), g["max_lr"], g["min_lr"]) for g in groups if "max_lr" in g and "min_lr" in g]


def carry_group_lrs(lrs, optimizer) -> None:
    """Give the grown optimizer's param groups the source's max/min LR, group kind by group kind."""
    by_kind = {tuple(k): (hi, lo) for k, hi, lo in (lrs or [])}
    for g in getattr(optimizer, "param_groups", None) or []:
        if group_key(g) in by_kind and "max_lr" in g:
            g["max_lr"], g["min_lr"] = by_kind[group_key(g)]


def _scalers(optimizer) -> list:
    opts = getattr(optimizer, "chained_optimizers", None) or ([optimizer] if optimizer is not None else [])
    return [o.grad_scaler for o in opts if getattr(o, "grad_scaler", None) is not None]


def grad_scaler_state(optimizer) -> dict | None:
    """fp16's dynamic loss scaler (scale, growth and hysteresis trackers) of a live optimizer, copied."""
    for gs in _scalers(optimizer):
        sd = gs.state_dict()
        if sd:
            return {k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in sd.items()}
    return None


def saved_grad_scaler_state(common: dict) -> dict | None:
    """The loss scaler's state in a checkpoint's ``common.pt`` (``optimizer.grad_scaler``, at any nesting
    depth: one chunk's optimizer or a chained one's) or in :func:`live_common`'s ``grad_scaler``."""
    if common.get("grad_scaler"):
        return common["grad_scaler"]
    todo = [common.get("optimizer")]
    while todo:
        d = todo.pop(0)
        if not isinstance(d, dict):
            continue
        if isinstance(d.get("grad_scaler"), dict) and d["grad_scaler"]:
            return d["grad_scaler"]
        todo.extend(v for v in d.values() if isinstance(v, dict))
    return None


def carry_grad_scaler(state: dict | None, optimizer) -> None:
    """Give the grown optimizer the source's loss scale: growth preserves the loss, so the scale the run
    settled on still fits (a fresh one restarts at --initial-loss-scale and skips steps until it backs off)."""
    if not state:
        return
    for gs in _scalers(optimizer):
        if gs.state_dict():  # dynamic (a constant scaler has no state)
            gs.load_state_dict({k: (v.clone() if hasattr(v, "clone") else v) for k, v in state.items()})


def grow(source, spec: GrowthSpec, old_cfg: Config, common: dict,
         new_cfg: Config = None) -> tuple[Components, TrainState, dict]:
    """Build the grown components at the target layout and fill them from ``source``: a
    checkpoint or the running job's own shards (:mod:`megatron_staged.growth.sources`).
    ``common`` is the source's non-sharded state, as a checkpoint's ``common.pt`` holds it.

    Returns (components, train_state, stats); the state's stage history ends with this growth.
    Collective.
    """
    from megatron_staged.checkpoint.manager import set_optimizer_step

    if new_cfg is None:
        new_cfg = target_config(old_cfg, spec, dist.get_world_size())
    # initialize: else every weight comes from the source; a distributed optimizer's moments are
    # left unwritten until the growth writes them (each element once), so that the target's
    # moments take memory only as the source's are released
    comps = build_components(new_cfg, initialize=needs_fresh_init(spec),
                             zero_optimizer_state=not new_cfg.parallel.use_distributed_optimizer)
    stats = grow_sharded_state(source, spec, old_cfg.model, comps.model, comps.optimizer)

    saved = dict(common.get("train_state", {}))
    state = TrainState.from_dict(dict(saved, iteration=common.get("iteration", saved.get("iteration", 0))))
    set_optimizer_step(comps.optimizer, saved.get("optimizer_step", 0))
    carry_grad_scaler(saved_grad_scaler_state(common), comps.optimizer)
    sched = common.get("opt_param_scheduler") or {}
    s_pre = int(sched.get("num_steps", state.iteration))
    if "max_lr" in sched and not new_cfg.checkpoint.override_opt_param_scheduler:
        # the schedule the source ran on (a run resumed with other --lr/--min-lr keeps its checkpoint's, Megatron's
        # rule, also in the optimizer's param groups, which the scheduler reads), not one rebuilt from the flags
        comps.scheduler.load_state_dict(sched)
        carry_group_lrs(common.get("param_group_lrs"), comps.optimizer)
    rho = spec.effective_rho()
    s_target = int(round(s_pre / rho))
    comps.scheduler.jump_to(s_target, spec.rewarmup_iters)
    old_layout = common.get("parallel_layout", {})
    state.stage_history.append({
        "iteration": state.iteration,
        "consumed_samples": state.consumed_train_samples,
        "flops_so_far": state.flops_so_far,
        "operator": operator_name(spec),
        "from": dict(describe(old_cfg), **{k: old_layout.get(k) for k in ("tp", "pp", "dp", "vp")}),
        "to": describe(new_cfg, comps.layout),
        "rho": rho, "schedule_step_before": s_pre, "schedule_step_after": s_target,
        "rewarmup_iters": spec.rewarmup_iters, "spec": spec.to_dict(),
    })
    return comps, state, stats
