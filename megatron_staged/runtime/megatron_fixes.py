"""Corrections to megatron-core 0.16.1 that this project depends on (applied once, idempotent).

``DistributedOptimizer.get_parameter_state_dp_zero`` concatenates each bucket's gathered state
*without* the padding at bucket ends ("gets rid of the padding between buckets"), but
``sharded_param_state_fully_reshardable`` then slices that tensor with ``param_index_map``
offsets, which count the padding. Every parameter after a padded bucket end is saved shifted by the
padding: with pipeline parallelism and tied embeddings (the shared embedding gets its own bucket)
the embedding's fp32 main weight and Adam moments were written one row off at TP1 PP2 (found by
``tests/test_growth.py::test_grown_state_equals_oracle_at_every_layout``). Loading is unaffected (it
slices per parameter). The fix re-lays the gathered state out with the padding, so the offsets
index it correctly; only the fully_reshardable path, the one this project uses, reads it.
"""
from __future__ import annotations

import torch

_APPLIED = False


def _with_bucket_padding(self, state):
    for gbuf_idx, dtype_state in state.items():
        if not isinstance(gbuf_idx, int):  # e.g. "buckets_coalesced"
            continue
        buckets = self.buffers[gbuf_idx].buckets
        total = sum(b.grad_data.numel() for b in buckets)
        for world in dtype_state.values():
            for key, t in list(world.items()):
                if not torch.is_tensor(t) or t.dim() != 1:
                    continue
                padded = torch.zeros(total, dtype=t.dtype, device=t.device)
                src = dst = 0
                for b in buckets:
                    n = b.numel_unpadded
                    padded[dst:dst + n] = t[src:src + n]
                    src += n
                    dst += b.grad_data.numel()
                world[key] = padded
    return state


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.get_parameter_state_dp_zero

    def get_parameter_state_dp_zero(self, *args, **kwargs):
        state = original(self, *args, **kwargs)
        return state if state is None else _with_bucket_padding(self, state)

    DistributedOptimizer.get_parameter_state_dp_zero = get_parameter_state_dp_zero
    _APPLIED = True
