"""Growth stages inside a running job.

Stages come from the config (YAML); their keys are the fields of
:class:`megatron_staged.growth.spec.GrowthRequest` (the ``grow`` flags with underscores, plus
when the stage runs and ``eval_iters``). Each stage names at most one of ``at_iteration``,
``at_fraction`` (of ``--train-iters``; the default, 0.8, when none is named), ``at_flops`` or
``trigger: slope`` (grow when the learning curve's slope rises above the paper's threshold for the
operator, or ``slope_threshold``; see :mod:`megatron_staged.staging.triggers`)::

    staging:
      stages:
        - {at_iteration: 200, depth_factor: 2}                       # 4 -> 8 layers, identity init
        - {trigger: slope, width_factor: 2, target_tensor_model_parallel_size: 2}
      stop_at_optimality: true     # end the run when the last model's slope says so

Stages run in the order they are listed.

Every pending stage is checked when the run starts, each against the model the stages before it
produce (factor, placement, divisibility by the target TP/PP, iteration within ``--train-iters``),
so a stage that cannot map fails before iteration 1 with an error naming its YAML key.

At a stage boundary the runner grows the running job's own shards (model weights, fp32 masters,
Adam moments; :class:`megatron_staged.growth.sources.LiveSource`) with the same engine the offline
tool uses on a checkpoint: no checkpoint is written or read, ``--save`` is not needed, and ranks
exchange only the slices their target shards need. The layout is rebuilt without a restart. It
returns the grown components; the trainer continues on them (and, with ``--save``, saves the grown
state as the run's latest checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_staged.builders import Components
from megatron_staged.config import Config
from megatron_staged.errors import UserError, require
from megatron_staged.growth.apply import operator_name
from megatron_staged.growth.spec import GrowthRequest, make_spec, target_config
from megatron_staged.staging.triggers import THRESHOLDS, SlopeTrigger, stage_curve
from megatron_staged.training.flops import flops_per_iteration
from megatron_staged.training.state import TrainState


@dataclass
class Stage:
    index: int                 # position in staging.stages (for error messages and rollback dirs)
    request: GrowthRequest

    @property
    def at_iteration(self) -> Optional[int]:
        return self.request.at_iteration


# What a stage is: the growth it asks for and its point. A checkpoint's history names a stage by its
# index, so a stage list edited after a growth (one removed, or inserted before it) would shift a
# different stage onto a recorded index and skip it silently.
_IDENTITY = ("width_factor", "depth_factor", "num_layers", "at_flops", "trigger")


def _same_stage(stage: Stage, spec: dict) -> bool:
    r = stage.request
    for key in _IDENTITY:
        if key in spec and spec[key] != getattr(r, key):
            return False
    if r.at_fraction is None and spec.get("at_fraction") is None and "at_iteration" in spec:
        return spec["at_iteration"] == r.at_iteration
    return True


def _done(stage: Stage, history: list) -> bool:
    for h in history:
        if "stage_index" in h:
            if h["stage_index"] == stage.index:
                if isinstance(h.get("spec"), dict) and not _same_stage(stage, h["spec"]):
                    raise UserError(
                        f"staging.stages[{stage.index}] is not the stage {stage.index} this run applied at "
                        f"iteration {h.get('iteration')} ({h.get('operator')}: "
                        f"{(h.get('from') or {}).get('num_layers')} layers x {(h.get('from') or {}).get('hidden_size')}"
                        f" -> {(h.get('to') or {}).get('num_layers')} layers x "
                        f"{(h.get('to') or {}).get('hidden_size')}); the stage list was edited after it ran: keep the "
                        f"stages that ran, in order, at the head of staging.stages")
                return True
        elif stage.at_iteration is not None and h.get("iteration") == stage.at_iteration:
            return True  # a checkpoint from before stage indices were recorded
    return False


def plan_stages(cfg: Config, stages: list, world_size: int, state: TrainState) -> list[Stage]:
    """The stages still to run, in list order, each checked against the model the ones before it
    produce. Stages run in the order they are listed; fixed points (``at_iteration``,
    ``at_flops``) must increase along the list."""
    all_stages = [Stage(n, GrowthRequest.from_stage(s, n)) for n, s in enumerate(stages or [])]
    for st in all_stages:  # at_fraction: a fixed iteration of this run
        if st.request.at_fraction is not None:
            st.request = dataclasses.replace(st.request, at_iteration=fraction_iteration(st.request.at_fraction, cfg))
    last: dict[str, tuple[int, float, Optional[float]]] = {}
    for st in all_stages:
        n, r = st.index, st.request
        if r.at_iteration is not None:
            point = _point_name(r, "at_iteration", n)
            require(r.at_iteration >= 0, f"{point} must be >= 0")
            require(r.at_iteration < cfg.training.train_iters,
                    f"{point} is not before --train-iters {cfg.training.train_iters}: the stage would never run (a "
                    f"growth runs after its iteration's step; to grow the run's final checkpoint, run `megatron-staged "
                    f"grow` on it, or raise --train-iters)")
        if r.at_flops is not None:
            require(r.at_flops > 0, f"staging.stages[{n}].at_flops {r.at_flops} must be > 0")
        for key in ("at_iteration", "at_flops"):
            v = getattr(r, key)
            if v is None:
                continue
            if key in last:
                prev_n, prev_v, prev_frac = last[key]
                prev = f"{prev_v:g}" if prev_frac is None else f"at_fraction {prev_frac:g} (iteration {prev_v:g})"
                require(v > prev_v, f"{_point_name(r, key, n)} is not after staging.stages[{prev_n}]'s {prev}; "
                                    f"list the stages in the order they run")
            last[key] = (n, v, r.at_fraction if key == "at_iteration" else None)
        require(r.eval_iters is None or r.eval_iters >= 1, f"staging.stages[{n}].eval_iters must be >= 1")
    pending = [st for st in all_stages if not _done(st, state.stage_history)]
    for st in pending[:1]:  # later stages wait for this one: their points may have passed
        r = st.request
        if _should_have_run(r, state):
            key = "at_iteration" if r.at_iteration is not None else "at_flops"
            raise UserError(f"{_point_name(r, key, st.index)} lies before the resumed iteration "
                            f"{state.iteration} and was never applied; remove it or resume earlier")
    model_cfg = cfg
    for st in pending:
        spec = make_spec(model_cfg, st.request, st.index)
        try:
            model_cfg = target_config(model_cfg, spec, world_size)
        except UserError as e:
            raise UserError(f"staging.stages[{st.index}]: {e}") from None
    return pending


def _point_name(r: GrowthRequest, key: str, n: int) -> str:
    """How an error names a stage's point: as the user wrote it (at_fraction resolves to an iteration)."""
    if key == "at_iteration" and r.at_fraction is not None:
        return f"staging.stages[{n}].at_fraction {r.at_fraction:g} (iteration {r.at_iteration})"
    return f"staging.stages[{n}].{key} {getattr(r, key):g}"


def _should_have_run(r: GrowthRequest, state: TrainState) -> bool:
    """Whether the next stage was due at a loop start before the resumed iteration N (so the run that
    saved this checkpoint would have grown it): a stage is checked from the iteration of the growth
    before it on, at each loop start k < N, against the state after k iterations. A run stopped right
    after iteration N (--exit-interval, a save, a requeue) has not yet checked it at N."""
    n = state.iteration
    since = int(state.stage_history[-1].get("iteration", 0)) if state.stage_history else 0
    if since >= n:
        return False
    if r.at_iteration is not None:
        return r.at_iteration <= n - 1
    if r.at_flops is not None:  # FLOPs so far after iteration N - 1 (0 at the start)
        before = 0.0 if n == 1 else next((float(f) for it, _, f in state.loss_history if int(it) == n - 1), None)
        return before is not None and r.at_flops <= before
    return False


def fraction_iteration(fraction: float, cfg: Config) -> int:
    """The iteration ``round(fraction x --train-iters)`` (at least 1: iteration 0 has nothing trained)."""
    return max(1, int(round(fraction * cfg.training.train_iters)))


def _point_iteration(r: GrowthRequest, it: int, flops: float, per_iter: float) -> Optional[int]:
    """The iteration at which a stage's fixed point is reached from iteration ``it`` with ``flops``
    FLOPs so far and ``per_iter`` FLOPs per iteration from here (a point already passed: ``it``, the
    trainer's rule); None for a slope trigger (known only during the run)."""
    import math

    if r.at_iteration is not None:
        return max(r.at_iteration, it)
    if r.at_flops is not None:
        return it + max(0, math.ceil((r.at_flops - flops) / per_iter))
    return None


def expansion_warnings(cfg: Config, stages: list, world_size: int = 1,
                       state: Optional[TrainState] = None) -> list[str]:
    """One line per expansion stage (Bu 2025: from 0/1 layers, LR unchanged) whose point lies where
    the paper found expansion does not recover: after WSD's decay has begun, or late in a cosine or
    linear decay (past half the decay span, where the LR is below half its peak). An ``at_flops``
    point is placed at the iteration that reaches it (as ``plan`` does); a point after a slope
    trigger's is unknown unless it is an ``at_iteration``."""
    from megatron_staged.config import lr_schedule_steps

    o = cfg.optim
    steps = lr_schedule_steps(cfg)
    out, model_cfg = [], cfg
    it, flops, known = 0, 0.0, True  # iteration and FLOPs at the stage before; known: not after a slope trigger
    if state is not None and state.iteration:
        it, flops = state.iteration, state.flops_so_far
    need_flops = any(st.request.at_flops is not None for st in stages)
    for st in stages:
        spec = make_spec(model_cfg, st.request, st.index)
        try:
            next_cfg = target_config(model_cfg, spec, world_size)
        except UserError:
            next_cfg = model_cfg
        r = st.request
        per_iter = flops_per_iteration(model_cfg.model, model_cfg.training.global_batch_size) if need_flops else 0.0
        at = _point_iteration(r, it, flops, per_iter) if known or r.at_iteration is not None else None
        if at is None or not known:
            known = False  # FLOPs from here on are unknown
        else:
            flops, it = flops + (at - it) * per_iter, at
        if at is not None and at >= cfg.training.train_iters:
            break  # never reached: the run ends without this stage and those after it
        if spec.is_expansion and at is not None:
            point = (f"iteration {at}" if r.at_flops is None else f"iteration {at} (at_flops {r.at_flops:g})")
            where = f"staging.stages[{st.index}] expands {spec.old_num_layers} -> {spec.new_num_layers} layers at {point}"
            if o.lr_decay_style == "WSD":
                decay_start = steps["decay"] - (steps["wsd_decay"] or 0)
                if at >= decay_start:
                    out.append(f"warning: {where}, after the WSD decay starts (iteration {decay_start:g}); Bu (2025) "
                               f"expands in the stable phase: use an earlier point (e.g. at_fraction 0.8) or a "
                               f"shorter --lr-wsd-decay-iters")
            elif o.lr_decay_style in ("cosine", "linear"):
                span = max(steps["decay"] - steps["warmup"], 1)
                if (at - steps["warmup"]) / span >= 0.5:
                    out.append(f"warning: {where}, late in the {o.lr_decay_style} decay (LR below half its peak); "
                               f"Bu (2025) found late expansion under cosine decay does not catch up: use "
                               f"--lr-decay-style WSD or expand earlier")
        model_cfg = next_cfg
    return out


def schedule_end_warnings(cfg: Config, stages: list, world_size: int = 1,
                          state: Optional[TrainState] = None) -> list[str]:
    """A line when the growths' schedule jumps (each sets the LR schedule back to ``S_pre / rho``)
    leave the run ending before its LR schedule does: a schedule that would have decayed to
    ``--min-lr`` within ``--train-iters`` (WSD's decay, cosine, linear) stops short of it, or never
    starts WSD's decay. Worked out from the stages' fixed points (as growth/apply.py moves the
    scheduler); nothing is said when a slope trigger's point is unknown."""
    import math

    from megatron_staged.config import lr_schedule_steps

    o, t = cfg.optim, cfg.training
    if o.lr_decay_style not in ("linear", "cosine", "WSD") or not stages:
        return []
    steps = lr_schedule_steps(cfg)
    T, decay = t.train_iters, steps["decay"]
    if decay > T:  # the schedule was set to outlast the run anyway
        return []
    it, step, flops = 0, 0, 0.0
    if state is not None and state.iteration:
        it, flops = state.iteration, state.flops_so_far
        last = state.stage_history[-1] if state.stage_history else None
        step = (int(last["schedule_step_after"]) + it - int(last["iteration"])
                if last and "schedule_step_after" in last else it)
    model_cfg = cfg
    for st in stages:
        r = st.request
        per_iter = flops_per_iteration(model_cfg.model, model_cfg.training.global_batch_size)
        if r.at_iteration is not None:
            at = r.at_iteration
        elif r.at_flops is not None:
            at = it + max(0, math.ceil((r.at_flops - flops) / per_iter))
        else:
            return []  # a slope trigger: its point, hence the jump, is known only during the run
        at = max(at, it)
        if at >= T:  # never reached: the run ends without this stage and those after it
            break
        step, flops, it = step + (at - it), flops + (at - it) * per_iter, at
        spec = make_spec(model_cfg, r, st.index)
        step = int(round(step / spec.effective_rho()))
        try:
            model_cfg = target_config(model_cfg, spec, world_size)
        except UserError:
            return []
    final = step + (T - it)
    if final >= decay:
        return []
    what = (f"the WSD decay (from schedule step {decay - steps['wsd_decay']:g}) never starts: the run ends at the "
            f"peak LR" if o.lr_decay_style == "WSD" and final <= decay - steps["wsd_decay"] else
            f"the run ends {decay - final:g} steps before the {o.lr_decay_style} decay reaches --min-lr {o.min_lr:g}")
    fix = (f"--lr-decay-samples {final * t.global_batch_size}" if t.train_samples is not None
           else f"--lr-decay-iters {final}")
    return [f"warning: the growths set the LR schedule back by {T - final} steps (S_pre / rho), so at --train-iters "
            f"{T} it reaches schedule step {final} of {decay:g}: {what}; to end the decay with the run, set {fix} "
            f"(or train {decay - final:g} iterations longer)"]


def current_stage_curve(state: TrainState, cfg: Config):
    """(iterations, curve) of the model trained since the last growth, on the from-scratch
    compute axis (see staging/triggers.py)."""
    since, step0, flops0 = 0, 0, 0.0
    if state.stage_history:
        h = state.stage_history[-1]
        since, step0, flops0 = int(h["iteration"]), int(h.get("schedule_step_after", 0)), h.get("flops_so_far")
    fpi = flops_per_iteration(cfg.model, cfg.training.global_batch_size)
    return stage_curve(state.loss_history, since, fpi, step0, flops_at_start=flops0)


def slope_fires(state: TrainState, cfg: Config, threshold: float) -> Optional[dict]:
    """The trigger's reading if the current stage's curve has crossed ``threshold`` by now."""
    st = cfg.staging
    its, curve = current_stage_curve(state, cfg)
    if not curve or its[-1] != state.iteration:
        return None
    trigger = SlopeTrigger(threshold, window_ratio=st.slope_window_ratio, min_points=st.slope_min_points,
                           patience=st.slope_patience)
    hit = trigger.first_firing(curve)
    if hit is None:
        return None
    return {"trigger": "slope", "threshold": threshold, "slope": hit["slope"], "slope_min": hit["slope_min"],
            "fired_at_iteration": its[hit["index"]], "loss": curve[hit["index"]][1],
            "flops_so_far": state.flops_so_far}


class StageRunner:
    """Knows which configured growth is due, and performs it on the trainer's components."""

    def __init__(self, cfg: Config, world_size: int, state: TrainState):
        from megatron_staged.runtime.distributed import print_rank0

        self.pending = plan_stages(cfg, cfg.staging.stages, world_size, state)
        from megatron_staged.model.builder import check_sequence_parallel

        model_cfg = cfg  # a stage that reaches TP > 1 with --sequence-parallel is built mid-run: check it now
        for st in self.pending:
            model_cfg = target_config(model_cfg, make_spec(model_cfg, st.request, st.index), world_size)
            check_sequence_parallel(model_cfg, f"staging.stages[{st.index}] grows to TP"
                                               f"{model_cfg.parallel.tensor_model_parallel_size}: ")
        for line in (expansion_warnings(cfg, self.pending, world_size, state)
                     + schedule_end_warnings(cfg, self.pending, world_size, state)):
            print_rank0(line)

    def due(self, state: TrainState, cfg: Config) -> tuple[Optional[Stage], Optional[dict]]:
        """The next stage if it is due now, with why (for the log and the stage history)."""
        if not self.pending:
            return None, None
        st, r = self.pending[0], self.pending[0].request
        why = None
        if r.at_iteration is not None and state.iteration >= r.at_iteration:
            why = {"trigger": "iteration", "at_iteration": r.at_iteration}
        elif r.at_flops is not None and state.flops_so_far >= r.at_flops:
            why = {"trigger": "flops", "at_flops": r.at_flops, "flops_so_far": state.flops_so_far}
        elif r.trigger == "slope" and state.iteration % max(1, cfg.staging.slope_check_interval) == 0:
            threshold = r.slope_threshold
            if threshold is None:
                threshold = THRESHOLDS[operator_name(make_spec(cfg, r, st.index))]
            why = slope_fires(state, cfg, threshold)
        if why is None:
            return None, None
        self.pending.pop(0)
        return st, why

    def never_ran(self, state: TrainState, cfg: Config) -> list[str]:
        """One note per stage still pending when the run reached --train-iters (a slope trigger that did
        not fire, an at_flops point beyond the run's compute): the run ends on the ungrown model."""
        lines = []
        for st in self.pending:
            r = st.request
            point = (f"at_flops {r.at_flops:g} (the run reached {state.flops_so_far:.4g} FLOPs)"
                     if r.at_flops is not None else
                     "trigger: slope (the slope never rose above its threshold)" if r.trigger == "slope" else
                     f"at_iteration {r.at_iteration}" if r.at_iteration is not None else "its point")
            lines.append(f"note: staging.stages[{st.index}] never ran before --train-iters "
                         f"{cfg.training.train_iters}: {point}; the run ends without that growth")
        return lines

    def optimality_reached(self, state: TrainState, cfg: Config) -> Optional[dict]:
        """With ``--stop-at-optimality``, after the last stage: the reading once the slope says that
        training the current model further is no longer compute-optimal (Shen et al.'s OPTIMALITY)."""
        st = cfg.staging
        if not st.stop_at_optimality or self.pending or state.iteration % max(1, st.slope_check_interval):
            return None
        return slope_fires(state, cfg, st.optimality_threshold)

    @staticmethod
    def grow(request: GrowthRequest, old: Components, state: TrainState,
             stage_index: Optional[int] = None) -> tuple[Components, TrainState, dict]:
        """Grow ``old`` (consumed: its model and optimizer are released) and ``state``.

        Returns the grown components, the grown state (its stage history ends with this growth)
        and the growth's statistics. Collective.
        """
        import gc

        from megatron_staged.growth.apply import grow
        from megatron_staged.growth.sources import LiveSource, return_freed_memory

        old_cfg = old.cfg
        spec = make_spec(old_cfg, request, stage_index)
        new_cfg = target_config(old_cfg, spec, dist.get_world_size())  # fail before touching anything
        common = live_common(old, state)
        source = LiveSource(old.model, old.optimizer)  # under the source layout: captures what growth reads
        release_model(old.model)
        old.model = old.optimizer = old.scheduler = old.layer_drop = None  # the source keeps only what growth reads
        gc.collect()
        return_freed_memory()
        grown, new_state, stats = grow(source, spec, old_cfg, common, new_cfg)
        return grown, new_state, stats


def release_model(model_chunks) -> None:
    """Let a dropped model be freed: megatron's DDP keeps each parameter's gradient accumulator
    (``grad_accs``), whose backward hook refers back to the DDP object through a C++ node that
    Python's garbage collector cannot see into; without this, the model, its grad buffer and
    (through the model config's ``grad_scale_func``) the optimizer and its state would stay alive."""
    for chunk in model_chunks or []:
        if getattr(chunk, "grad_accs", None) is not None:
            chunk.grad_accs.clear()
        config = getattr(chunk, "config", None)
        for hook in ("grad_scale_func", "finalize_model_grads_func", "no_sync_func", "param_sync_func"):
            if config is not None and hasattr(config, hook):
                setattr(config, hook, None)


def live_common(old: Components, state: TrainState) -> dict:
    """The running job's non-sharded state, as a checkpoint's ``common.pt`` would hold it."""
    from megatron_staged.checkpoint.manager import get_optimizer_step

    lay = old.layout
    step = get_optimizer_step(old.optimizer) if old.optimizer is not None else 0
    from megatron_staged.growth.apply import grad_scaler_state, group_lrs

    return {"iteration": state.iteration, "train_state": dict(state.to_dict(), optimizer_step=step),
            "opt_param_scheduler": old.scheduler.state_dict() if old.scheduler is not None else {},
            "param_group_lrs": group_lrs(old.optimizer),
            "grad_scaler": grad_scaler_state(old.optimizer),
            "parallel_layout": lay.as_dict()}
