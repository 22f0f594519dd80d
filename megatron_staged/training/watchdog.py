"""Stop a torchrun worker whose launcher died.

torchrun starts its workers in sessions of their own, so killing the launcher with SIGKILL (a
person's ``kill -9``, an OOM killer) leaves them running: still training, still writing
checkpoints, into directories a restarted job will use. A cluster scheduler kills the whole job;
this covers the other cases. A daemon thread polls the parent process id: when the launcher dies
the worker is re-parented (to init or a subreaper), and the thread ends the process at once with
``os._exit`` — no ``finally`` blocks, no further writes. A save in flight is left as its
``iter_XXXXXXX.tmp``, which is never loaded (saves are atomic). The worker's forked children
(megatron-core's checkpoint-writer processes) are killed with it (``PR_SET_PDEATHSIG``), so they
write nothing more either.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STATUS = 143  # as if terminated by SIGTERM
_started = False


def launcher_watchdog(poll_seconds: float = 1.0) -> bool:
    """Start the watchdog if this process was launched by torchrun; returns whether it started."""
    global _started
    if _started or "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return False
    parent = os.getppid()
    if parent <= 1:
        return False

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                try:
                    sys.stderr.write(f"rank {os.environ.get('RANK', '?')}: the torchrun launcher (pid {parent}) is "
                                     f"gone; stopping without writing anything more\n")
                    sys.stderr.flush()
                finally:
                    os._exit(EXIT_STATUS)

    from megatron_staged.runtime.process import forked_children_die_with_this_process

    forked_children_die_with_this_process()
    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
    _started = True
    return True
