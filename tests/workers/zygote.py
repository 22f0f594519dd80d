"""A pre-imported interpreter that forks one fresh process per ``megatron-staged`` command (tests only).

Every ``run_cli`` in the tests used to start a new interpreter that spent ~3.5 s CPU importing torch,
megatron-core and the trainer before a 0.5 s tiny run. This process imports them once (started by
``tests/conftest.py`` with the children's environment), then for each request read from stdin (one
JSON line: argv, stdout/stderr file paths, timeout) forks a child that runs
``megatron_staged.cli.main(argv)`` exactly as ``python -m megatron_staged ARGV`` would: its own
process and session, stdin from /dev/null, stdout/stderr to the files, fresh Python/NumPy random
state, and a normal interpreter exit (atexit handlers, non-daemon threads joined). Nothing has run in
this process but imports, so the child starts from the state a fresh import gives. The reply (one
JSON line on stdout) is the child's exit status; the child's whole session is killed afterwards, as
``conftest._run`` does for a subprocess.
"""
import json
import os
import signal
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def preload() -> None:
    import megatron.core  # noqa: F401
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron_staged.cli  # noqa: F401
    import megatron_staged.checkpoint.manager  # noqa: F401
    import megatron_staged.tools.convert  # noqa: F401
    import megatron_staged.tools.grow  # noqa: F401
    import megatron_staged.training.trainer  # noqa: F401


def child(req: dict) -> None:
    """In the forked child: become ``python -m megatron_staged ARGV`` and exit through SystemExit."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
    os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])  # the environment a subprocess started now would get
    import random

    random.seed()  # a new process draws its own seed
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    import megatron_staged.__main__ as entry

    sys.argv = [entry.__file__, *req["argv"]]
    from megatron_staged.cli import main

    sys.exit(main(req["argv"]))  # unwinds through serve(): a normal interpreter exit


def serve() -> None:
    preload()
    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(req)
            except SystemExit:
                raise
            except BaseException:  # as an uncaught exception in a fresh interpreter: traceback, status 1
                import traceback

                traceback.print_exc()
                sys.stdout.flush()
                sys.exit(1)
        deadline = time.monotonic() + req["timeout"]
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
            elif time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                status = {"timeout": status}
            else:
                time.sleep(0.02)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever the command left behind (checkpoint-writer processes)
        except ProcessLookupError:
            pass
        sys.stdout.write(json.dumps({"status": status}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
