"""Growth stages inside a running job.

Stages come from the config (YAML); their keys are the fields of
:class:`megatron_staged.growth.spec.GrowthRequest` (the ``grow`` flags with underscores, plus
``at_iteration`` and ``eval_iters``)::

    staging:
      stages:
        - {at_iteration: 200, depth_factor: 2}                       # 4 -> 8 layers, identity init
        - {at_iteration: 400, width_factor: 2, target_tensor_model_parallel_size: 2}

Every pending stage is checked when the run starts, each against the model the stages before it
produce (factor, placement, divisibility by the target TP/PP, iteration within ``--train-iters``),
so a stage that cannot map fails before iteration 1 with an error naming its YAML key.

At a stage boundary the runner saves the training state (to ``<save>/stage_<n>_pre_growth`` when
``--save`` is set: a rollback point; else to a temporary directory), and hands that checkpoint to
the same growth code the offline tool uses; the layout is rebuilt without a restart. It returns
the grown components; the trainer continues on them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_staged.builders import Components
from megatron_staged.config import Config
from megatron_staged.errors import UserError, require
from megatron_staged.growth.spec import GrowthRequest, make_spec, target_config
from megatron_staged.training.state import TrainState


@dataclass
class Stage:
    index: int                 # position in staging.stages (for error messages and rollback dirs)
    request: GrowthRequest

    @property
    def at_iteration(self) -> int:
        return self.request.at_iteration


def plan_stages(cfg: Config, stages: list, world_size: int, state: TrainState) -> list[Stage]:
    """The stages still to run, each checked against the model the ones before it produce."""
    requests = [GrowthRequest.from_stage(s, n) for n, s in enumerate(stages or [])]
    done = {h.get("iteration") for h in state.stage_history}
    seen: dict[int, int] = {}
    for n, r in enumerate(requests):
        require(r.at_iteration >= 0, f"staging.stages[{n}].at_iteration {r.at_iteration} must be >= 0")
        require(r.at_iteration not in seen, f"staging.stages[{n}].at_iteration {r.at_iteration} repeats "
                                            f"staging.stages[{seen.get(r.at_iteration)}]'s; merge the two stages")
        seen[r.at_iteration] = n
        require(r.at_iteration < cfg.training.train_iters,
                f"staging.stages[{n}].at_iteration {r.at_iteration} is not before --train-iters "
                f"{cfg.training.train_iters}: the stage would never run")
        require(r.eval_iters is None or r.eval_iters >= 1, f"staging.stages[{n}].eval_iters must be >= 1")
    pending = sorted((Stage(n, r) for n, r in enumerate(requests) if r.at_iteration not in done),
                     key=lambda s: s.at_iteration)
    stale = [s for s in pending if s.at_iteration < state.iteration]
    if stale:
        raise UserError(f"staging.stages[{stale[0].index}] at iteration {stale[0].at_iteration} lies before the "
                        f"resumed iteration {state.iteration} and was never applied; remove it or resume earlier")
    model_cfg = cfg
    for s in pending:
        spec = make_spec(model_cfg, s.request, s.index)
        try:
            model_cfg = target_config(model_cfg, spec, world_size)
        except UserError as e:
            raise UserError(f"staging.stages[{s.index}]: {e}") from None
    return pending


class StageRunner:
    """Knows which configured growth is due, and performs it on the trainer's components."""

    def __init__(self, cfg: Config, world_size: int, state: TrainState):
        self.pending = plan_stages(cfg, cfg.staging.stages, world_size, state)

    def due(self, iteration: int) -> Optional[Stage]:
        if self.pending and self.pending[0].at_iteration == iteration:
            return self.pending.pop(0)
        return None

    @staticmethod
    def grow(request: GrowthRequest, old: Components, state: TrainState,
             stage_index: Optional[int] = None) -> tuple[Components, TrainState, dict]:
        """Grow ``old`` (consumed: its model and optimizer are released) and ``state``.

        Returns the grown components, the grown state (its stage history ends with this growth)
        and the growth's statistics. Collective.
        """
        import gc

        from megatron_staged.checkpoint.manager import load_common, resolve_checkpoint_dir, save_checkpoint
        from megatron_staged.growth.apply import grow_from_checkpoint

        old_cfg = old.cfg
        spec = make_spec(old_cfg, request, stage_index)
        new_cfg = target_config(old_cfg, spec, dist.get_world_size())  # fail before touching anything
        n = len(state.stage_history)
        tmp = None
        if old_cfg.checkpoint.save:
            root = os.path.join(old_cfg.checkpoint.save, f"stage_{n}_pre_growth")
        else:
            holder = [tempfile.mkdtemp(prefix="megatron_staged_growth_") if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(holder, src=0)
            root = tmp = holder[0]
        save_checkpoint(root, state.iteration, old.model, old.optimizer, old.scheduler, state.to_dict(),
                        old_cfg.to_dict())
        src_dir, _ = resolve_checkpoint_dir(root)
        common = load_common(src_dir)
        old.model = old.optimizer = old.scheduler = None  # free the small model before building the big one
        gc.collect()
        grown, new_state, stats = grow_from_checkpoint(src_dir, spec, old_cfg, common, new_cfg)
        if tmp is not None:
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        return grown, new_state, stats
