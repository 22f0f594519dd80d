"""The run's bookkeeping, in one place: what a checkpoint's ``train_state`` holds.

Everything a resumed or grown run must carry over besides weights and optimizer moments:
iteration, consumed samples (the data position), FLOPs so far, the stage history and the recent
loss history. Keys this version does not know (e.g. ``hf_import`` from an imported checkpoint)
are kept in ``extra`` and written back unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

# Kept in memory and in checkpoints alike (the same last N points either way, so slope triggers,
# which read it, decide the same after a resume).
LOSS_HISTORY_KEPT = 100_000
# written by the checkpoint manager, about the checkpoint rather than the run
CHECKPOINT_KEYS = ("optimizer_step", "has_optimizer", "args", "rng_restored")


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    flops_so_far: float = 0.0
    stage_history: list = field(default_factory=list)
    loss_history: list = field(default_factory=list)   # (iteration, loss, flops so far)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.extra, iteration=self.iteration, consumed_train_samples=self.consumed_train_samples,
                    flops_so_far=self.flops_so_far, stage_history=list(self.stage_history),
                    loss_history=[list(x) for x in self.loss_history[-LOSS_HISTORY_KEPT:]])

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in known and k not in CHECKPOINT_KEYS}
        return cls(iteration=int(d.get("iteration", 0)),
                   consumed_train_samples=int(d.get("consumed_train_samples", 0)),
                   flops_so_far=float(d.get("flops_so_far", 0.0)),
                   stage_history=list(d.get("stage_history", [])),
                   loss_history=[tuple(x) for x in d.get("loss_history", [])],
                   extra=extra)

    def record_step(self, loss: float, global_batch_size: int, flops: float) -> None:
        self.iteration += 1
        self.consumed_train_samples += global_batch_size
        self.flops_so_far += flops
        self.loss_history.append((self.iteration, loss, self.flops_so_far))
        if len(self.loss_history) > LOSS_HISTORY_KEPT:
            del self.loss_history[:len(self.loss_history) - LOSS_HISTORY_KEPT]
