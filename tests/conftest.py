"""Shared test helpers: launch megatron_staged under torchrun (gloo, CPU) and read its records."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Strict device discipline for every run the tests start (subprocesses inherit it): a CPU run
# fails where a GPU run would, e.g. a collective on a host tensor (see runtime/cpu_backend.py).
os.environ.setdefault("MEGATRON_STAGED_STRICT_DEVICE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int, env: dict) -> subprocess.CompletedProcess:
    """Run in a new session with output in files, then kill whatever it left behind.

    dist_checkpointing starts a multiprocessing manager process per rank that outlives a rank
    that crashes (the save-crash test kills ranks on purpose); with pipes, it would hold them open.
    """
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=str(ROOT), stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


# torch.distributed's rendezvous variables: a test that ran the CLI in this process set them (and holds
# MASTER_PORT's store open); a child must pick its own
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                  "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _env(extra: dict | None = None) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in RENDEZVOUS_ENV:
        e.pop(k, None)
    e.update(extra or {})
    return e


def torchrun(args: list[str], nproc: int, timeout: int = 600, check: bool = True, env: dict | None = None,
             module: str = "megatron_staged", script: str | None = None,
             real: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --nproc-per-node N -m MODULE ARGS`` (or a script).

    A run expected to succeed (``check``) has its ranks forked by the pre-imported zygote with
    torchrun's worker environment (a fresh process per rank, no launcher process): a failing rank
    fails the test either way. A run whose failure or launcher the test examines (``check=False``),
    one with ``real=True`` (the launch path users take, kept in a few tests), and every run when
    MEGATRON_STAGED_TESTS_REAL_TORCHRUN=1 go through the real torchrun."""
    real = real or os.environ.get("MEGATRON_STAGED_TESTS_REAL_TORCHRUN") == "1"
    if check and not real:
        r = _Zygote.run(args, timeout, nproc=nproc, env=env, module=module, script=script)
        if r.returncode != 0:
            raise AssertionError(f"torchrun --nproc-per-node {nproc} {' '.join(r.args[1:])} failed ({r.returncode}):\n"
                                 f"{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
        return r
    target = [script] if script else ["-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *target, *args]
    r = _run(cmd, timeout, _env(env))
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


class _Zygote:
    """``tests/workers/zygote.py``: one interpreter with torch, megatron-core and the trainer imported,
    forking a fresh process per command (saves ~3.5 s CPU of start-up and imports per command). One
    command at a time per zygote: a test running commands from several threads gets one zygote per
    thread (started on demand, kept for the session)."""

    idle: list = []
    started: list = []
    lock = threading.Lock()

    @classmethod
    def _acquire(cls) -> subprocess.Popen:
        with cls.lock:
            while cls.idle:
                z = cls.idle.pop()
                if z.poll() is None:
                    return z
        z = subprocess.Popen([sys.executable, str(ROOT / "tests" / "workers" / "zygote.py")], cwd=str(ROOT),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        with cls.lock:
            cls.started.append(z)
        if not z.stdout.readline():
            raise RuntimeError(f"tests/workers/zygote.py did not start ({z.wait()})")
        return z

    @classmethod
    def run(cls, args: list[str], timeout: int, nproc: int | None = None, env: dict | None = None,
            module: str = "megatron_staged", script: str | None = None) -> subprocess.CompletedProcess:
        import tempfile

        z = cls._acquire()
        with tempfile.TemporaryDirectory() as d:
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            z.stdin.write(json.dumps({"argv": list(args), "stdout": out, "stderr": err, "cwd": str(ROOT),
                                      "env": _env(env), "timeout": timeout, "nproc": nproc,
                                      "port": free_port(), "module": module, "script": script}) + "\n")
            z.stdin.flush()
            reply = z.stdout.readline()
            if not reply:
                raise RuntimeError(f"tests/workers/zygote.py died ({z.wait()})")
            with cls.lock:
                cls.idle.append(z)
            status = json.loads(reply)["status"]
            cmd = [sys.executable, *([script] if script else ["-m", module]), *args]
            if isinstance(status, dict):
                raise subprocess.TimeoutExpired(cmd, timeout)
            return subprocess.CompletedProcess(cmd, status, open(out).read(), open(err).read())


@pytest.fixture(scope="session", autouse=True)
def _stop_zygote():
    yield
    for z in _Zygote.started:
        if z.poll() is None:
            z.stdin.close()
    for z in _Zygote.started:
        try:
            z.wait(timeout=30)
        except subprocess.TimeoutExpired:
            z.kill()


def run_cli(args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """One process, no torchrun (as a user would run a tool): forked by the pre-imported
    tests/workers/zygote.py, so each command still runs in a fresh process of its own."""
    r = _Zygote.run(args, timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"megatron-staged {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def cli_in_process(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """``megatron-staged ARGS`` run by ``megatron_staged.cli.main`` in this process (stdout and stderr
    captured): for the commands that need no megatron-core and no process group (report, fit-rho),
    where a fresh interpreter per call costs seconds of start-up and imports. Same result shape and
    same check as :func:`run_cli`."""
    import contextlib
    import io

    from megatron_staged.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's own exits (--help), as the process would end
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    r = subprocess.CompletedProcess(["megatron-staged", *args], rc, out.getvalue(), err.getvalue())
    if check and r.returncode != 0:
        raise AssertionError(f"megatron-staged {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def read_records(path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def losses(path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_records(path) if "loss" in r}


# A tiny model and data that every multi-process test shares (fp32, dropout 0).
TINY_GPT2 = ["--model-family", "gpt2", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
             "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--log-interval", "1", "--eval-iters", "2",
             "--progress-bar", "off"]
TINY_LLAMA = ["--model-family", "llama", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
              "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "192",
              "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
              "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-iters", "2", "--progress-bar", "off"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The built-in corpus (stdlib sources -> sentencepiece -> .bin/.idx), small, built once."""
    from megatron_staged.data import prepare_default_corpus

    d = tmp_path_factory.mktemp("corpus")
    info = prepare_default_corpus(str(d), vocab_size=512, max_bytes=1_500_000)
    return ["--data-path", info["data_prefix"], "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", info["tokenizer_model"], "--split", "98,2,0"]


# A tiny model on mock data: one process, a few seconds (the reliability and bad-input tests).
TINY_MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "2",
             "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
             "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "1", "--progress-bar", "off"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A real checkpoint root with iterations 1 and 2 (tracker -> 2), written by one plain process."""
    d = tmp_path_factory.mktemp("tiny_ckpt") / "ckpt"
    run_cli(["train", *TINY_MOCK, "--train-iters", "2", "--save-interval", "1", "--save", str(d)], timeout=900)
    return d
