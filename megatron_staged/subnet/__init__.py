"""Progressive subnetworks (RaPTr) and progressive layer dropping (PLD).

The full model exists from the start; each training step runs a random subset of its transformer
layers, the same on every TP/PP rank of a replica and on every DP replica, drawn from the seed and
the iteration with no communication. See :mod:`.schedule` (which layers, when) and :mod:`.layers`
(how a dropped layer is skipped inside megatron-core, DDP and the optimizer), and docs/raptr.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron_staged.subnet.schedule import build_schedule, enabled, validate_subnet  # noqa: F401

if TYPE_CHECKING:
    from megatron_staged.subnet.layers import LayerDropController


def attach_layer_drop(components) -> Optional["LayerDropController"]:
    """Build the run's LayerDropController and hook it into ``components`` (None when off)."""
    cfg = components.cfg
    schedule = build_schedule(cfg)
    if schedule is None:
        return None
    from megatron.core import parallel_state as ps

    from megatron_staged.subnet.layers import LayerDropController

    ctl = LayerDropController(schedule, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                              skip_optimizer_update=cfg.subnet.layer_drop_skip_optimizer_update)
    ctl.attach(components.model, components.optimizer, cfg.parallel.overlap_grad_reduce)
    return ctl
