"""Learning-rate schedules: megatron-core's OptimizerParamScheduler plus a growth re-warmup.

Styles (``--lr-decay-style``): constant, linear, cosine, inverse-square-root and WSD (warmup,
stable, decay over ``--lr-wsd-decay-iters`` with ``--lr-wsd-decay-style`` exponential | linear |
cosine | minus_sqrt), all with linear warmup over ``--lr-warmup-iters``. Steps are iterations.

After a growth the run continues on the *target* model's schedule at step ``S_pre / rho``; the
jump can raise the learning rate, so the scheduler multiplies by a linear re-warmup ramp
``min(1, (step - begin) / rewarmup_iters)`` for the next ``rewarmup_iters`` steps.
"""
from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_staged.config import OptimizerConfig


class StagedParamScheduler(OptimizerParamScheduler):
    """OptimizerParamScheduler with an optional re-warmup window after a growth."""

    def __init__(self, *args, **kwargs):
        self.rewarmup_begin = 0
        self.rewarmup_iters = 0
        super().__init__(*args, **kwargs)

    def get_lr(self, param_group: dict) -> float:
        lr = super().get_lr(param_group)
        if self.rewarmup_iters > 0 and self.num_steps < self.rewarmup_begin + self.rewarmup_iters:
            frac = max(self.num_steps - self.rewarmup_begin, 0) / self.rewarmup_iters
            lr *= max(frac, 1.0 / self.rewarmup_iters)  # never exactly 0: the first step still moves
        return lr

    def jump_to(self, step: int, rewarmup_iters: int) -> None:
        """Continue at schedule step ``step`` with a re-warmup ramp of ``rewarmup_iters`` steps."""
        self.rewarmup_begin = int(step)
        self.rewarmup_iters = int(rewarmup_iters)
        self.num_steps = int(step)
        self.step(0)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update(rewarmup_begin=self.rewarmup_begin, rewarmup_iters=self.rewarmup_iters)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.rewarmup_begin = sd.get("rewarmup_begin", 0)
        self.rewarmup_iters = sd.get("rewarmup_iters", 0)
        super().load_state_dict(sd)


def build_scheduler(optimizer, o: OptimizerConfig, train_iters: int, override: bool = False,
                    steps: dict | None = None) -> StagedParamScheduler:
    """``steps``: warmup/decay/wsd_decay lengths in iterations from ``config.lr_schedule_steps`` (which
    also covers Megatron-LM's sample-based flags and --lr-warmup-fraction); default from ``o``."""
    decay_iters = o.lr_decay_iters or train_iters
    steps = steps or {"warmup": o.lr_warmup_iters, "decay": decay_iters, "wsd_decay": o.lr_wsd_decay_iters}
    decay_iters = steps["decay"]
    return StagedParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=steps["warmup"],
        lr_decay_steps=decay_iters,
        lr_decay_style=o.lr_decay_style,
        # Megatron-LM: weight decay constant, or from start to end over the whole run (train_iters)
        start_wd=o.weight_decay if o.weight_decay_incr_style == "constant" else o.start_weight_decay,
        end_wd=o.weight_decay if o.weight_decay_incr_style == "constant" else o.end_weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style=o.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=not override,
        override_opt_param_scheduler=override,
        wsd_decay_steps=steps["wsd_decay"] if o.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style=o.lr_wsd_decay_style if o.lr_decay_style == "WSD" else None,
    )
