"""Growth stages inside a running job.

Stages come from the config (YAML)::

    staging:
      stages:
        - {at_iteration: 200, depth_factor: 2}                       # 4 -> 8 layers, identity init
        - {at_iteration: 400, width_factor: 2, target_tensor_model_parallel_size: 2}

Keys: ``at_iteration`` and the options of ``megatron-staged grow`` with underscores
(``num_layers``, ``depth_factor``, ``depth_map``, ``depth_placement``, ``depth_init``,
``width_factor``, ``width_split``, ``width_noise``, ``target_tensor_model_parallel_size``,
``target_pipeline_model_parallel_size``, ``rho``, ``rewarmup_iters``, and ``eval_iters`` for the
before/after loss check).

At a stage boundary the runner saves the training state (to ``<save>/stage_<n>_pre_growth`` when
``--save`` is set: a rollback point; else to a temporary directory), rebuilds the process groups
for the target layout, and hands that checkpoint to the same growth code the offline tool uses —
no restart. It prints the eval loss just before and just after, on the same batches.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from megatron_staged.errors import UserError

STAGE_KEYS = {"at_iteration", "num_layers", "depth_factor", "depth_map", "depth_placement", "depth_init",
              "width_factor", "width_split", "width_noise", "target_tensor_model_parallel_size",
              "target_pipeline_model_parallel_size", "rho", "rewarmup_iters", "eval_iters"}


def check_stage(stage: dict, n: int) -> None:
    if not isinstance(stage, dict):
        raise UserError(f"staging.stages[{n}] must be a mapping, got {stage!r}")
    unknown = set(stage) - STAGE_KEYS
    if unknown:
        raise UserError(f"staging.stages[{n}]: unknown key(s) {sorted(unknown)}; allowed: {sorted(STAGE_KEYS)}")
    if "at_iteration" not in stage:
        raise UserError(f"staging.stages[{n}] needs at_iteration")


def spec_for_stage(stage: dict, cfg):
    from megatron_staged.growth.spec import DEFAULT_REWARMUP_ITERS, make_spec

    return make_spec(cfg, num_layers=stage.get("num_layers"), depth_factor=stage.get("depth_factor"),
                     depth_map=stage.get("depth_map"), placement=stage.get("depth_placement", "interleave"),
                     depth_init=stage.get("depth_init", "identity"), width_factor=int(stage.get("width_factor", 1)),
                     width_split=float(stage.get("width_split", 0.6)), width_noise=float(stage.get("width_noise", 0.0)),
                     target_tp=stage.get("target_tensor_model_parallel_size"),
                     target_pp=stage.get("target_pipeline_model_parallel_size"), rho=stage.get("rho"),
                     rewarmup_iters=int(stage.get("rewarmup_iters", DEFAULT_REWARMUP_ITERS)))


class StageRunner:
    """Applies the configured growth stages when their iteration is reached."""

    def __init__(self, trainer):
        self.trainer = trainer
        stages = list(trainer.cfg.staging.stages or [])
        for n, s in enumerate(stages):
            check_stage(s, n)
        done = {h.get("iteration") for h in trainer.stage_history}
        self.pending = sorted((s for s in stages if s["at_iteration"] not in done),
                              key=lambda s: s["at_iteration"])
        stale = [s for s in self.pending if s["at_iteration"] < trainer.iteration]
        if stale:
            raise UserError(f"growth stage at iteration {stale[0]['at_iteration']} lies before the resumed "
                            f"iteration {trainer.iteration} and was never applied; remove it or resume earlier")

    def maybe_grow(self) -> None:
        while self.pending and self.pending[0]["at_iteration"] == self.trainer.iteration:
            self.grow(self.pending.pop(0))

    def grow(self, stage: dict) -> dict:
        from megatron_staged.checkpoint.manager import load_common, resolve_checkpoint_dir, save_checkpoint
        from megatron_staged.growth.apply import grow_from_checkpoint
        from megatron_staged.growth.spec import target_config

        tr = self.trainer
        old_cfg = tr.cfg
        spec = spec_for_stage(stage, old_cfg)
        new_cfg = target_config(old_cfg, spec, dist.get_world_size())  # fail before touching anything
        eval_iters = int(stage.get("eval_iters", old_cfg.training.eval_iters))
        before = tr.evaluate(eval_iters)

        n = len(tr.stage_history)
        tmp = None
        if old_cfg.checkpoint.save:
            root = os.path.join(old_cfg.checkpoint.save, f"stage_{n}_pre_growth")
        else:
            holder = [tempfile.mkdtemp(prefix="megatron_staged_growth_") if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(holder, src=0)
            root = tmp = holder[0]
        save_checkpoint(root, tr.iteration, tr.model, tr.optimizer, tr.scheduler, tr.train_state(),
                        old_cfg.to_dict())
        src_dir, _ = resolve_checkpoint_dir(root)
        common = load_common(src_dir)

        tr.model = tr.optimizer = tr.scheduler = None  # free the small model before building the big one
        gc.collect()
        new_cfg, model, optimizer, scheduler, state, stats = grow_from_checkpoint(src_dir, spec, old_cfg, common, new_cfg)
        tr.stage_history = state["stage_history"]
        tr.replace_components(new_cfg, model, optimizer, scheduler)
        after = tr.evaluate(eval_iters)
        entry = tr.stage_history[-1]
        totals = torch.tensor([stats["seconds"], float(stats["bytes_read"])], dtype=torch.float64)
        dist.all_reduce(totals[:1], op=dist.ReduceOp.MAX)  # the checkpoint's common state must agree
        dist.all_reduce(totals[1:], op=dist.ReduceOp.SUM)
        stats = {"seconds": float(totals[0]), "bytes_read": int(totals[1])}
        entry.update(eval_loss_before=before, eval_loss_after=after, growth_seconds=stats["seconds"],
                     bytes_read=stats["bytes_read"])
        e = entry
        tr.logger.event(
            f" growth at iteration {tr.iteration}: {e['operator']} {e['from']['num_layers']} layers x "
            f"{e['from']['hidden_size']} (TP{e['from']['tp']} PP{e['from']['pp']}) -> {e['to']['num_layers']} "
            f"layers x {e['to']['hidden_size']} (TP{e['to']['tp']} PP{e['to']['pp']} DP{e['to']['dp']}) | "
            f"eval loss before: {before:.6f} | after: {after:.6f} | diff: {after - before:+.2e} | "
            f"LR schedule step {e['schedule_step_before']} -> {e['schedule_step_after']} (rho {e['rho']:.3g}, "
            f"re-warmup {e['rewarmup_iters']}) | {stats['seconds']:.2f}s",
            event="growth", iteration=tr.iteration, eval_loss_before=before, eval_loss_after=after,
            num_layers=e["to"]["num_layers"], hidden_size=e["to"]["hidden_size"])
        if tmp is not None:
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        elif old_cfg.checkpoint.save:
            tr.save()  # the grown state becomes the latest checkpoint of the run
        return entry
