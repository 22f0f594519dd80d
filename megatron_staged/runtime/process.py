"""Child processes that die with the process that made them (Linux ``PR_SET_PDEATHSIG``)."""
from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent (``parent_pid``) dies; if the parent is
    already gone, exit now. Returns False where the request is not available (not Linux)."""
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)
    return True


_forker = [0]
_registered = False


def forked_children_die_with_this_process() -> None:
    """From now on, every ``os.fork()`` child of this process (multiprocessing's fork workers, e.g.
    megatron-core's checkpoint writers) is killed when this process dies. Idempotent."""
    global _registered
    if _registered:
        return
    os.register_at_fork(before=lambda: _forker.__setitem__(0, os.getpid()),
                        after_in_child=lambda: die_with_parent(_forker[0]))
    _registered = True
