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


def child(req: dict, rank_env: dict | None = None) -> None:
    """In the forked child: become ``python -m MODULE ARGV`` (or ``python SCRIPT ARGV``), with torchrun's
    worker variables in ``rank_env`` for a rank, and exit through SystemExit."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_APPEND), 1)  # ranks share the files, as under torchrun
    os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_APPEND), 2)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])  # the environment a subprocess started now would get
    os.environ.update(rank_env or {})
    import random

    random.seed()  # a new process draws its own seed
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if req.get("script"):
        import runpy

        sys.argv = [req["script"], *req["argv"]]
        sys.path[0] = os.path.dirname(os.path.abspath(req["script"]))
        runpy.run_path(req["script"], run_name="__main__")
        sys.exit(0)
    import importlib

    module = req.get("module", "megatron_staged")
    if module != "megatron_staged":
        import runpy

        sys.argv = [importlib.util.find_spec(module).origin, *req["argv"]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        sys.exit(0)
    import megatron_staged.__main__ as entry

    sys.argv = [entry.__file__, *req["argv"]]
    from megatron_staged.cli import main

    sys.exit(main(req["argv"]))  # unwinds through serve(): a normal interpreter exit


def fork_child(req: dict, rank_env: dict | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            child(req, rank_env)
        except SystemExit:
            raise
        except BaseException:  # as an uncaught exception in a fresh interpreter: traceback, status 1
            import traceback

            traceback.print_exc()
            sys.stdout.flush()
            sys.exit(1)
    return pid


def kill_session(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def launch(req: dict):
    """One process (run_cli), or ``nproc`` ranks as torchrun's workers on one node (rank-0 store at
    MASTER_PORT): a rank that fails stops the others (SIGTERM, then SIGKILL), as torchrun does, and the
    status is then 1 (torchrun's); otherwise 0. A timeout kills every process: {"timeout": ...}."""
    for f in (req["stdout"], req["stderr"]):
        open(f, "w").close()
    nproc = req.get("nproc")
    if nproc is None:
        pids = [fork_child(req)]
    else:
        pids = []
        for r in range(nproc):
            pids.append(fork_child(req, {
                "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(r), "ROLE_WORLD_SIZE": str(nproc),
                "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(req["port"]),
                "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                "OMP_NUM_THREADS": req["env"].get("OMP_NUM_THREADS", "1")}))
    deadline = time.monotonic() + req["timeout"]
    codes, stop_at = {}, None
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(st)
        if time.monotonic() > deadline:
            for pid in pids:
                kill_session(pid)
            for pid in pids:
                if pid not in codes:
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return {"timeout": list(codes.values())}
        if nproc is not None and stop_at is None and any(c != 0 for c in codes.values()):
            stop_at = time.monotonic() + 30
            for pid in pids:
                if pid not in codes:
                    kill_session(pid, signal.SIGTERM)
        if stop_at is not None and time.monotonic() > stop_at:
            for pid in pids:
                kill_session(pid)
        time.sleep(0.02)
    for pid in pids:
        kill_session(pid)  # whatever the command left behind (checkpoint-writer processes)
    if nproc is None:
        return codes[pids[0]]
    return 0 if all(c == 0 for c in codes.values()) else 1


def serve() -> None:
    preload()
    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        status = launch(json.loads(line))
        sys.stdout.write(json.dumps({"status": status}) + "\n")
        sys.stdout.flush()

if __name__ == "__main__":
    serve()
