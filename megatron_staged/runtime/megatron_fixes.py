"""Corrections to megatron-core 0.16.1 that this project depends on: :func:`install` / :func:`uninstall`.

``DistributedOptimizer.get_parameter_state_dp_zero`` concatenates each bucket's gathered state
*without* the padding at bucket ends ("gets rid of the padding between buckets"), but
``sharded_param_state_fully_reshardable`` then slices that tensor with ``param_index_map``
offsets, which count the padding. Every parameter after a padded bucket end is saved shifted by the
padding: with pipeline parallelism and tied embeddings (the shared embedding gets its own bucket)
the embedding's fp32 main weight and Adam moments were written one row off at TP1 PP2 (found by
``tests/test_growth.py::test_grown_state_equals_oracle_at_every_layout``). Loading is unaffected (it
slices per parameter). The fix re-lays the gathered state out with the padding, so the offsets
index it correctly; only the fully_reshardable path, the one this project uses, reads it.

``filesystem_async._get_write_results_queue`` starts, on a rank's first torch_dist save, a
``multiprocessing`` manager process (spawn) that holds the writers' results queue. It outlives its
rank whenever the rank does not exit through Python's ``atexit`` (SIGKILL, SIGTERM's default action,
the launcher watchdog's ``os._exit``): found as orphans of 270 MB each, re-parented to init, after
test jobs. The fix starts the same manager with an initializer that asks the kernel to kill it when
its rank dies (Linux ``PR_SET_PDEATHSIG``; elsewhere unchanged).
"""
from __future__ import annotations

import torch

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


def _results_queue_dying_with_rank():
    """megatron's ``_get_write_results_queue``, with a manager process that dies with its rank."""
    import multiprocessing as mp
    import os
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from megatron_staged.runtime.process import die_with_parent

    if fa._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        fa._results_queue = manager.Queue()
        _MANAGERS.append(manager)  # kept alive with the queue (its proxy needs the server)
    return fa._results_queue


KNOWN_VERSIONS = ("0.16.1",)  # the megatron-core releases these fixes were checked against
FIXES = (
    "DistributedOptimizer.get_parameter_state_dp_zero: re-insert bucket-end padding so that "
    "fully_reshardable saves slice parameters at their param_index_map offsets (without it, "
    "parameters after a padded bucket end, e.g. tied embeddings at PP>1, are saved shifted)",
    "filesystem_async._get_write_results_queue: the checkpoint writers' results-queue manager process "
    "dies with its rank (without it, a rank killed or ended by os._exit leaves it running, re-parented to init)",
)
_STATE: dict | None = None
_MANAGERS: list = []


def megatron_core_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except Exception:  # noqa: BLE001 - very old or unusual installs
        import importlib.metadata

        return importlib.metadata.version("megatron-core")
    return __version__


def install() -> list[str]:
    """Apply the fixes (idempotent); returns what they patch and why.

    On a megatron-core version other than :data:`KNOWN_VERSIONS` the fixes are applied only if the
    internals they wrap are still there (with a warning: re-check them); otherwise UserError.
    """
    global _STATE
    if _STATE is not None:
        return list(FIXES)
    import warnings

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_staged.errors import UserError

    version = megatron_core_version()
    if version not in KNOWN_VERSIONS:
        if not hasattr(DistributedOptimizer, "get_parameter_state_dp_zero"):
            raise UserError(f"megatron-core {version} is not supported (checked: {', '.join(KNOWN_VERSIONS)}); "
                            f"install megatron-core=={KNOWN_VERSIONS[-1]}")
        warnings.warn(f"megatron-core {version} is not a version megatron_staged's fixes were checked against "
                      f"({', '.join(KNOWN_VERSIONS)}); applying them anyway: {'; '.join(FIXES)}")
    original = DistributedOptimizer.get_parameter_state_dp_zero

    def get_parameter_state_dp_zero(self, *args, **kwargs):
        state = original(self, *args, **kwargs)
        return state if state is None else _with_bucket_padding(self, state)

    DistributedOptimizer.get_parameter_state_dp_zero = get_parameter_state_dp_zero
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _STATE = {"original": original, "version": version,
              "results_queue": getattr(filesystem_async, "_get_write_results_queue", None)}
    if _STATE["results_queue"] is not None:
        filesystem_async._get_write_results_queue = _results_queue_dying_with_rank
    return list(FIXES)


def uninstall() -> None:
    global _STATE
    if _STATE is None:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.get_parameter_state_dp_zero = _STATE["original"]
    if _STATE["results_queue"] is not None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._get_write_results_queue = _STATE["results_queue"]
    _STATE = None


def is_installed() -> bool:
    return _STATE is not None


# the name older callers use
apply = install
