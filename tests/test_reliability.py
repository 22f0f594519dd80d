"""Reliability behaviours that need a real run: Megatron's restart conventions, damaged-checkpoint
fallback, the resume LR-schedule rule, ``inspect --verify``, ``--overwrite``, rank-0-only errors.

Each launch is one plain process on a 2-layer model with mock data (a few seconds each); the
bad-input catalogue itself is tests/test_bad_inputs.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import TINY_MOCK, read_records, run_cli, torchrun  # noqa: E402

TRACKER = "latest_checkpointed_iteration.txt"


def _tracker(d):
    return (d / TRACKER).read_text().strip()


def _records(log):
    return {r["iteration"]: r for r in read_records(log) if "loss" in r}


def test_load_absent_starts_from_scratch_then_resumes(tmp_path):
    """Megatron's job-script convention: --load $CKPT --save $CKPT for the first run and every requeue."""
    ckpt = tmp_path / "ckpt"
    args = ["train", *TINY_MOCK, "--load", str(ckpt), "--save", str(ckpt)]
    first = run_cli([*args, "--train-iters", "2"])
    warn = [l for l in first.stderr.splitlines() if l.startswith("warning:")]
    assert len(warn) == 1 and "no such directory; starting from scratch" in warn[0], first.stderr[-2000:]
    assert _tracker(ckpt) == "2"
    log = tmp_path / "second.jsonl"
    second = run_cli([*args, "--train-iters", "3", "--log-file", str(log), "--use-checkpoint-opt_param-scheduler"])
    assert "warning:" not in second.stderr, second.stderr[-2000:]
    assert sorted(_records(log)) == [3] and _tracker(ckpt) == "3"


def test_damaged_latest_falls_back_only_when_asked(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    victim = ckpt / "iter_0000002" / "__0_0.distcp"
    with open(victim, "r+b") as fh:
        fh.truncate(100)
    args = ["train", *TINY_MOCK, "--train-iters", "3", "--load", str(ckpt), "--save", str(ckpt),
            "--use-checkpoint-opt_param-scheduler"]
    r = run_cli(args, check=False)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and str(victim) in err[0] and "--ckpt-fallback-to-intact" in err[0], r.stderr
    log = tmp_path / "log.jsonl"
    r = run_cli([*args, "--ckpt-fallback-to-intact", "--save-interval", "1", "--log-file", str(log)])
    assert "falling back to the newest intact one" in r.stderr and "iter_0000001" in r.stderr
    assert sorted(_records(log)) == [2, 3], "resumed after iteration 1"
    assert _tracker(ckpt) == "3"
    v = run_cli(["inspect", str(ckpt), "--verify"])
    assert v.stdout.count("ok ") == 3 and "DAMAGED" not in v.stdout  # the damaged iteration 2 was saved anew


def test_resume_schedule_follows_megatron_rule_and_says_so(tmp_path, tiny_checkpoint):
    """Extending --train-iters on resume: the checkpoint's schedule (LR already at min-lr 0), with a note;
    --override-opt-param-scheduler takes the flags' schedule."""
    logs = {}
    for mode, extra in (("checkpoint", []), ("override", ["--override-opt-param-scheduler"])):
        ckpt = tmp_path / mode
        shutil.copytree(tiny_checkpoint, ckpt)
        logs[mode] = tmp_path / f"{mode}.jsonl"
        r = run_cli(["train", *TINY_MOCK, "--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt),
                     "--log-file", str(logs[mode]), *extra])
        warn = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
        assert len(warn) == 1, r.stderr[-2000:]
        if mode == "checkpoint":
            assert "the checkpoint's LR schedule (Megatron's rule" in warn[0]
            assert "--train-iters gives 4, the checkpoint has 2" in warn[0] and "run at 0.0" in warn[0]
        else:
            assert "the flags' LR schedule (--override-opt-param-scheduler)" in warn[0]
    kept, overridden = _records(logs["checkpoint"]), _records(logs["override"])
    assert kept[3]["lr"] == 0.0 and kept[4]["lr"] == 0.0, "the checkpoint's schedule had decayed to min-lr"
    assert overridden[3]["lr"] > 0.0, "the flags' schedule decays over 4 iterations"


def test_resume_schedule_note_counts_from_the_schedulers_step_after_growth(capsys):
    """After a growth the scheduler runs behind the iteration (step S/rho): the resume note must name the
    iterations that really run at min-lr, found here by stepping megatron-core's own scheduler."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_staged.config import parse_config
    from megatron_staged.preflight import _check_schedule

    it, num_steps, decay, train_iters = 8, 5, 10, 14    # grown at iteration 7: step 7 -> 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=2,
                                    lr_decay_steps=decay, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=decay, wd_incr_style="constant")
    sched.num_steps = num_steps
    sched.step(0)
    at_min = []
    for i in range(it + 1, train_iters + 1):        # LR in effect during iteration i, then the step after it
        if opt.param_groups[0]["lr"] == 0.0:
            at_min.append(i)
        sched.step(1)
    cfg = parse_config(["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                        "--lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
                        "--train-iters", str(train_iters)])
    common = {"iteration": it, "opt_param_scheduler": dict(sched.state_dict(), num_steps=num_steps)}
    _check_schedule(cfg, common)
    err = capsys.readouterr().err
    assert "--train-iters gives 14, the checkpoint has 10" in err, err
    said = (f"iteration {train_iters} runs at 0.0" if at_min == [train_iters] else
            f"iterations {at_min[0]}-{train_iters} run at 0.0")
    assert said in err, (at_min, err)


def test_inspect_verify_finds_a_flipped_byte(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    ok = run_cli(["inspect", str(ckpt), "--verify"])
    assert ok.returncode == 0 and ok.stdout.count("sizes and CRC-32 match manifest.json") == 2, ok.stdout
    f = ckpt / "iter_0000001" / "__0_1.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    bad = run_cli(["inspect", str(ckpt), "--verify"], check=False)
    assert bad.returncode == 1
    line = [l for l in bad.stdout.splitlines() if l.startswith("DAMAGED")]
    assert len(line) == 1 and str(f) in line[0] and "CRC-32 differs" in line[0], bad.stdout
    manifest = json.loads((ckpt / "iter_0000002" / "manifest.json").read_text())
    assert {".metadata", "common.pt", "__0_0.distcp", "__0_1.distcp"} <= set(manifest["files"])


def test_convert_overwrite_replaces_the_other_checkpoint(tmp_path, tiny_checkpoint):
    """--overwrite into another run's checkpoint: its iterations are removed, one run under the tracker."""
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    shutil.move(str(other / "iter_0000001"), str(other / "iter_0000009"))
    (other / TRACKER).write_text("9")
    (other / "notes.txt").write_text("kept\n")
    run_cli(["convert", "--load", str(tiny_checkpoint / "iter_0000001"), "--save", str(other), "--overwrite"])
    assert _tracker(other) == "1"
    assert sorted(p.name for p in other.iterdir()) == ["iter_0000001", TRACKER, "notes.txt"]


def test_only_rank0_prints_the_error_under_torchrun(tmp_path):
    r = torchrun(["train", *TINY_MOCK, "--train-iters", "2", "--lr", "-1"], nproc=2, check=False, timeout=300)
    assert r.returncode != 0
    lines = [l for l in (r.stdout + r.stderr).splitlines() if "error: --lr -1.0 must be positive" in l]
    assert len(lines) == 1, r.stderr[-3000:]


# ---- exit conditions, non-finite steps, launcher death (trainer loop) ------------------------------

def _run_env(args, extra_env=None, timeout=900):
    from conftest import _env, _run

    return _run([sys.executable, "-m", "megatron_staged", *args], timeout, _env(extra_env))


def _wait_for_iterations(log, n, proc, timeout=600):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists() and len(_records(log)) >= n:
            return
        assert proc.poll() is None, "training ended early"
        time.sleep(0.5)
    raise AssertionError(f"no {n} iterations logged in {timeout}s")


def test_sigterm_with_exit_signal_handler_saves_and_exits_0(tmp_path):
    import signal
    import subprocess

    from conftest import ROOT, _env

    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "megatron_staged", "train", *TINY_MOCK, "--train-iters", "100000",
                              "--exit-signal-handler", "--save", str(ckpt), "--log-file", str(log)],
                             cwd=str(ROOT), env=_env(), stdout=out, stderr=err, start_new_session=True)
        try:
            _wait_for_iterations(log, 2, p)
            p.send_signal(signal.SIGTERM)
            rc = p.wait(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
    stdout = (tmp_path / "out").read_text()
    assert rc == 0, (tmp_path / "err").read_text()[-3000:]
    assert "received SIGTERM (--exit-signal-handler); saving a checkpoint" in stdout
    last = max(_records(log))
    assert _tracker(ckpt) == str(last) and (ckpt / f"iter_{last:07d}" / "manifest.json").exists()


def test_exit_duration_in_mins_saves_and_exits_0(tmp_path):
    ckpt = tmp_path / "ckpt"
    r = _run_env(["train", *TINY_MOCK, "--train-iters", "100000", "--exit-duration-in-mins", "0.0001",
                  "--save", str(ckpt)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exiting at iteration 1: ran" in r.stdout and "--exit-duration-in-mins 0.0001" in r.stdout
    assert _tracker(ckpt) == "1"


def test_non_finite_step_stops_with_last_good_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    r = _run_env(["train", *TINY_MOCK, "--train-iters", "5", "--save", str(ckpt)], {"MEGATRON_STAGED_FAULT": "nan:3"})
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "stopping: non-finite gradients at iteration 3; saved the last good state " \
                                "(iteration 2)" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert _tracker(ckpt) == "2"


def test_non_finite_step_skipped_changes_nothing(tmp_path):
    """--on-non-finite skip: the poisoned step leaves weights, moments and the LR schedule as they were."""
    from megatron_staged.checkpoint.global_tensors import read_common, read_global_tensors

    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    r = _run_env(["train", *TINY_MOCK, "--train-iters", "4", "--save", str(ckpt), "--save-interval", "1",
                  "--on-non-finite", "skip", "--log-file", str(log)], {"MEGATRON_STAGED_FAULT": "nan:3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "non-finite gradients at iteration 3; step skipped" in r.stdout
    recs = _records(log)
    assert sorted(recs) == [1, 2, 3, 4]
    # the log is strict JSON (no bare NaN, which jq/JavaScript/strict readers refuse): the poisoned
    # step's non-finite grad norm is null, and report/fit-rho read it back as NaN
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    for line in log.read_text().splitlines():
        json.loads(line, parse_constant=no_constants)
    assert recs[3]["grad_norm"] is None and isinstance(recs[2]["grad_norm"], float)
    from megatron_staged.tools.report import metric_records
    back = {r["iteration"]: r for r in metric_records(str(log)) if "loss" in r}
    assert math.isnan(back[3]["grad_norm"]) and back[2]["grad_norm"] == recs[2]["grad_norm"]
    before, after = read_global_tensors(str(ckpt / "iter_0000002")), read_global_tensors(str(ckpt / "iter_0000003"))
    assert sorted(before) == sorted(after)
    changed = [k for k in before if not bool((before[k] == after[k]).all())]
    assert not changed, f"the skipped step changed {changed}"
    s2, s3 = (read_common(str(ckpt / f"iter_000000{i}"))["opt_param_scheduler"]["num_steps"] for i in (2, 3))
    assert s2 == s3, "the LR schedule did not advance on the skipped step"
    later = read_global_tensors(str(ckpt / "iter_0000004"))
    assert any(not bool((after[k] == later[k]).all()) for k in after), "training continued after the skip"


def _is_worker(proc) -> bool:
    """A training worker (not a finished helper process: a zombie has no command line)."""
    import psutil

    try:
        return "megatron_staged" in " ".join(proc.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _cmdline(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _running(proc) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it: it runs nothing)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _tagged(tag: str) -> list:
    """The running processes whose environment carries MEGATRON_STAGED_TEST_JOB=tag."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("MEGATRON_STAGED_TEST_JOB") == tag and _running(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_workers_stop_when_the_launcher_is_killed(tmp_path):
    """torchrun SIGKILLed: its workers (in sessions of their own) stop within seconds and write nothing more."""
    import signal
    import subprocess
    import time

    import psutil

    from conftest import ROOT, _env, free_port

    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megatron_staged", "train", *TINY_MOCK, "--train-iters", "100000", "--save", str(ckpt),
           "--save-interval", "2", "--log-file", str(log)]
    workers, helpers = [], []
    with open(tmp_path / "out", "w") as out:
        tag = f"{os.getpid()}-{time.time_ns()}"
        p = subprocess.Popen(cmd, cwd=str(ROOT), env=_env({"MEGATRON_STAGED_TEST_JOB": tag}), stdout=out, stderr=out,
                             start_new_session=True)
        try:
            _wait_for_iterations(log, 3, p)
            descendants = psutil.Process(p.pid).children(recursive=True)
            workers = [c for c in descendants if _is_worker(c)]
            assert len(workers) >= 2
            # the workers' own children: megatron's checkpoint-writer results-queue manager (spawned at
            # the first save) must not outlive them either
            helpers = [c for c in descendants if c not in workers and _cmdline(c)]
            assert any("spawn_main" in _cmdline(c) for c in helpers), [_cmdline(c) for c in descendants]
            os.kill(p.pid, signal.SIGKILL)  # the launcher only, as `kill -9 <torchrun>` does
            t0 = time.time()
            gone, alive = psutil.wait_procs(workers, timeout=30)
            stopped_after = time.time() - t0
            assert not alive, f"workers still running {stopped_after:.0f}s after the launcher died"
            assert stopped_after < 15
            # every process of the job (found by an environment variable only it carries, so also
            # children started after the snapshot, e.g. forked checkpoint writers) is gone
            while _tagged(tag) and time.time() - t0 < 30:
                time.sleep(0.2)
            left = [_cmdline(c) for c in _tagged(tag)]
            assert not left, f"the workers' child processes outlived them: {left}"
            snap = {q: q.stat().st_mtime_ns for q in ckpt.rglob("*")}
            time.sleep(3)
            assert {q: q.stat().st_mtime_ns for q in ckpt.rglob("*")} == snap, "files written after the workers stopped"
        finally:
            for q in [p, *workers, *helpers, *_tagged(tag)]:
                try:
                    q.kill()
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
    tracker = int(_tracker(ckpt))
    assert (ckpt / f"iter_{tracker:07d}" / "manifest.json").exists(), "the latest checkpoint is complete"


def test_resume_just_before_and_after_a_growth_stage_is_exact(tmp_path):
    """Interrupted (--exit-interval) just before and just after an in-run depth growth and resumed in a
    new process: the same losses, bit for bit, as the uninterrupted run."""
    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, rewarmup_iters: 2}\n")
    base = ["train", *TINY_MOCK, "--train-iters", "4", "--config", str(cfg)]
    straight = tmp_path / "straight.jsonl"
    run_cli([*base, "--log-file", str(straight)])
    ref = {i: r["loss"] for i, r in _records(straight).items()}
    assert sorted(ref) == [1, 2, 3, 4]
    for stop in (2, 3):  # 2: saved before the growth due at iteration 2; 3: one step after it
        ckpt = tmp_path / f"ckpt{stop}"
        first, second = tmp_path / f"first{stop}.jsonl", tmp_path / f"second{stop}.jsonl"
        run_cli([*base, "--exit-interval", str(stop), "--save", str(ckpt), "--log-file", str(first)])
        run_cli([*base, "--load", str(ckpt), "--save", str(ckpt), "--log-file", str(second)])
        got = {**{i: r["loss"] for i, r in _records(first).items()}, **{i: r["loss"] for i, r in _records(second).items()}}
        assert sorted(_records(second)) == list(range(stop + 1, 5))
        assert got == ref, f"interrupted at {stop}: {got} != {ref}"


def test_new_layer_identity_and_resume_inside_the_fresh_moment_window(tmp_path):
    """A stage ``depth_map: 0,new,1`` (depth_init identity) preserves the eval loss: the fresh layer's
    residual outputs are zeroed like the copies'. With ``fresh_moments: bias-corrected`` the masks of
    the fresh elements are saved with each checkpoint inside the correction window, so a run
    interrupted one and two steps after the growth and resumed reproduces the uninterrupted losses
    bit for bit (before, a resumed run fell back to plain Adam for those elements)."""
    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_map: '0,new,1', depth_init: identity, "
                   "fresh_moments: bias-corrected, rewarmup_iters: 0}\n")
    base = ["train", *TINY_MOCK, "--train-iters", "5", "--lr-warmup-iters", "0", "--config", str(cfg)]
    straight = tmp_path / "straight.jsonl"
    run_cli([*base, "--log-file", str(straight)])
    growth = [r for r in read_records(straight) if r.get("event") == "growth"]
    assert len(growth) == 1 and growth[0]["num_layers"] == 3
    assert growth[0]["eval_loss_after"] == pytest.approx(growth[0]["eval_loss_before"], rel=1e-6, abs=0), growth[0]
    ref = {i: r["loss"] for i, r in _records(straight).items()}
    assert sorted(ref) == [1, 2, 3, 4, 5]
    for stop in (3, 4):  # one and two optimizer steps into the correction window
        ckpt = tmp_path / f"ckpt{stop}"
        first, second = tmp_path / f"first{stop}.jsonl", tmp_path / f"second{stop}.jsonl"
        run_cli([*base, "--exit-interval", str(stop), "--save", str(ckpt), "--log-file", str(first)])
        from megatron_staged.checkpoint.global_tensors import read_common

        common = read_common(str(ckpt / f"iter_{stop:07d}"))
        assert common["fresh_moments"]["start_step"] == 2.0, "the masks are saved inside the window"
        r = run_cli([*base, "--load", str(ckpt), "--save", str(ckpt), "--log-file", str(second)])
        assert "resumed the correction" in r.stdout
        got = {**{i: x["loss"] for i, x in _records(first).items()}, **{i: x["loss"] for i, x in _records(second).items()}}
        assert got == ref, f"interrupted at {stop}: {got} != {ref}"


OLD_RNG_FORMAT = """
import sys
import numpy as np
from megatron_staged.checkpoint import manager

def as_before(state):  # checkpoints written before plain_rng_state stored numpy's tuple, array and all
    assert isinstance(state["np"][1], np.ndarray)
    return state

manager.plain_rng_state = as_before
from megatron_staged.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_of_a_checkpoint_with_a_numpy_array_rng_state(tmp_path):
    """An older checkpoint whose RNG state holds numpy's array (a byte entry read weights-only) resumes at
    the same layout with its RNG state (numpy's _reconstruct/ndarray/dtype are allow-listed for our loads)
    and reproduces the uninterrupted run's loss; before, it was refused unless --no-load-rng."""
    from conftest import _env, _run

    ckpt, straight, resumed = tmp_path / "ckpt", tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    args = ["train", *TINY_MOCK, "--train-iters", "2"]
    r = _run([sys.executable, "-c", OLD_RNG_FORMAT, *args, "--save-interval", "1", "--save", str(ckpt),
              "--log-file", str(straight)], 600, _env())
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([*args, "--load", str(ckpt / "iter_0000001"), "--log-file", str(resumed)])
    assert "error" not in r.stderr
    assert _records(resumed)[2]["loss"] == _records(straight)[2]["loss"]
