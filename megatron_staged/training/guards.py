"""What stops a training loop early, agreed by every rank: Megatron's exit conditions and non-finite steps.

* ``--exit-signal-handler``: SIGTERM (what a scheduler sends before it kills a job) sets a flag;
  at the end of the iteration every rank learns whether any rank got it, and the run saves a
  checkpoint and exits 0 (Megatron-LM's DistributedSignalHandler does the same with an all-gather).
* ``--exit-duration-in-mins``: once the slowest rank has run that long, save and exit 0.
* Non-finite loss or gradients (``--on-non-finite``): detected after the backward pass and before
  the optimizer step, on all ranks at once (one all-reduce). ``stop`` (default, Megatron's
  ``--check-for-nan-in-loss-and-grad``) saves the last good state — the step was not applied — and
  stops with one line; ``skip`` drops the step (no parameter, moment or LR-schedule update; the
  batch is consumed, as Megatron does with an fp16 overflow), up to
  ``--max-consecutive-skipped-iterations`` in a row.
"""
from __future__ import annotations

import math
import os
import signal
import time
from typing import Optional

import torch

from megatron_staged.runtime.distributed import all_reduce_scalar


class ExitConditions:
    """SIGTERM and wall-clock exit conditions; :meth:`check` is collective when either is enabled."""

    def __init__(self, exit_signal_handler: bool, exit_duration_in_mins: Optional[float], start_time: float):
        self.duration = exit_duration_in_mins or None  # 0: off, as Megatron-LM's `if args.exit_duration_in_mins:`
        self.start_time = start_time
        self.received: Optional[int] = None
        self._previous = None
        if exit_signal_handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    @property
    def enabled(self) -> bool:
        return self._previous is not None or self.duration is not None

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def check(self) -> Optional[str]:
        """Why to stop now (the same answer on every rank), or None."""
        if not self.enabled:
            return None
        if all_reduce_scalar(1.0 if self.received else 0.0, "max") > 0:
            return "received SIGTERM (--exit-signal-handler)"
        if self.duration is not None:
            minutes = all_reduce_scalar((time.time() - self.start_time) / 60.0, "max")
            if minutes >= self.duration:
                return f"ran {minutes:.2f} minutes (--exit-duration-in-mins {self.duration:g})"
        return None

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def grads_finite(model_chunks) -> bool:
    """Whether every gradient on this rank is finite (megatron DDP's contiguous grad buffers)."""
    for chunk in model_chunks:
        buffers = list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []) or [])
        if buffers:
            for b in buffers:
                if not bool(torch.isfinite(b.grad_data).all()):
                    return False
        else:
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None and not bool(torch.isfinite(g).all()):
                    return False
    return True


def step_is_finite(loss: float, model_chunks, check_grads: bool = True) -> bool:
    """Loss and gradients finite on every rank (collective).

    ``check_grads=False`` (fp16 with a dynamic loss scale): only the loss is checked. Gradients that
    overflow are the loss scaler's business, as in Megatron-LM: the optimizer finds them, skips the
    step and lowers the scale (an initial scale of 2**32 overflows on the first steps by design).
    """
    local = 1.0 if (math.isfinite(loss) and (not check_grads or grads_finite(model_chunks))) else 0.0
    return all_reduce_scalar(local, "min") > 0


def inject_nan(iteration: int, model_chunks) -> bool:
    """Test hook: poison the gradients of the step that produces ``iteration`` if
    MEGATRON_STAGED_FAULT=nan:<iteration> (as a bad batch or an LR spike would)."""
    if os.environ.get("MEGATRON_STAGED_FAULT") != f"nan:{iteration}":
        return False
    for chunk in model_chunks:
        for b in getattr(chunk, "buffers", []):
            b.grad_data.fill_(float("nan"))
    return True
