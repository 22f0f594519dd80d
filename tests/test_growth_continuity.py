"""What a growth inside a run must carry over, checked from first principles (REFERENCE.md 1).

One single-process run: gpt2 2 layers, grown in-run at iteration 6 to 4 layers (interleave,
identity, ``fresh_moments: bias-corrected``) with rho 2 and a 3-step re-warmup, trained to iteration 9.
Checked independently of the
code: the logged LR follows Megatron's warmup+cosine formula at schedule step S_pre/rho times the
linear ramp; the first update after growth is torch AdamW's update at the *kept* step S_pre + 1
(recomputed per tensor from the saved moments; a reset step would predict another update), and at
step 1 for the elements whose moments were zero at the growth; FLOPs
per iteration follow the textbook 72 B s L h^2 (1 + s/6h + V/12hL) before and after, and
iterations and consumed samples run on without a gap.
"""
from __future__ import annotations

import math

import pytest
import torch

import oracle as O
from conftest import TINY_GPT2, read_records, torchrun

GROW_AT, RHO, REWARM, ITERS = 6, 2.0, 3, 9
LR, WARMUP, DECAY = 1e-3, 2, 20
B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 0.01


def schedule(n: int) -> float:
    """Megatron's linear warmup then cosine decay to min_lr 0 over DECAY steps."""
    if n <= WARMUP:
        return LR * n / WARMUP
    ratio = (n - WARMUP) / (DECAY - WARMUP)
    return LR * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def lr_at(n: int, begin: int | None) -> float:
    """LR at schedule step n; after a jump to ``begin``, times the re-warmup ramp (never 0)."""
    lr = schedule(n)
    if begin is not None and n < begin + REWARM:
        lr *= max((n - begin) / REWARM, 1.0 / REWARM)
    return lr


@pytest.fixture(scope="session")
def inrun(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("continuity")
    cfg = root / "stages.yaml"
    cfg.write_text(f"staging:\n  stages:\n    - {{at_iteration: {GROW_AT}, depth_factor: 2, rho: {RHO}, "
                   f"rewarmup_iters: {REWARM}, fresh_moments: bias-corrected}}\n")
    flags = list(TINY_GPT2)
    flags[flags.index("--num-layers") + 1] = "2"
    flags[flags.index("--lr") + 1] = str(LR)
    flags[flags.index("--lr-warmup-iters") + 1] = str(WARMUP)
    torchrun(["train", "--config", str(cfg), *flags, *corpus, "--train-iters", str(ITERS),
              "--lr-decay-iters", str(DECAY), "--use-distributed-optimizer", "--save", str(root / "ckpt"),
              "--save-interval", str(GROW_AT + 1), "--log-file", str(root / "log.jsonl")], nproc=1)
    return root


def test_lr_jumps_to_s_pre_over_rho_with_rewarmup(inrun):
    recs = read_records(inrun / "log.jsonl")
    lr = {r["iteration"]: r["lr"] for r in recs if "lr" in r}
    assert sorted(lr) == list(range(1, ITERS + 1))
    s_target = round(GROW_AT / RHO)
    for it, got in lr.items():
        # the logged LR is the one set for the next step: schedule step = steps taken so far
        n, begin = (it, None) if it <= GROW_AT else (s_target + it - GROW_AT, s_target)
        assert got == pytest.approx(lr_at(n, begin), rel=1e-9, abs=1e-15), f"iteration {it}"
    ev = next(r for r in recs if r.get("event") == "growth")
    assert ev["iteration"] == GROW_AT
    common = O.read_common(str(inrun / "ckpt"))
    h = common["train_state"]["stage_history"][-1]
    assert (h["schedule_step_before"], h["schedule_step_after"]) == (GROW_AT, s_target)


def test_first_update_after_growth_is_adam_at_the_kept_step(inrun):
    """p7 = p6 (1 - lr wd) - lr m^/(sqrt(v^) + eps), bias corrections at step t = S_pre + 1 = 7 for the
    carried-over elements; with ``fresh_moments: bias-corrected``, at step k = 1 for the elements whose
    moments were zero at the growth (the new identity layers' linear_proj and linear_fc2)."""
    p0 = O.read_tensors(str(inrun / "ckpt" / f"iter_{GROW_AT:07d}"))
    p1 = O.read_tensors(str(inrun / "ckpt" / f"iter_{GROW_AT + 1:07d}"))
    assert O.read_common(str(inrun / "ckpt" / f"iter_{GROW_AT:07d}"))["train_state"]["optimizer_step"] == GROW_AT
    assert O.read_common(str(inrun / "ckpt" / f"iter_{GROW_AT + 1:07d}"))["train_state"]["optimizer_step"] == GROW_AT + 1
    lr = lr_at(round(GROW_AT / RHO), round(GROW_AT / RHO))  # the first step after the jump
    errs = O.adamw_step_errors(p0, p1, lr, GROW_AT + 1, fresh_step=1, betas=(B1, B2), eps=EPS, weight_decay=WD)
    kept = [e[0] for e in errs.values() if e[0] is not None]
    reset = [e[1] for e in errs.values() if e[1] is not None]
    fresh = [e[2] for e in errs.values() if e[2] is not None]
    assert len(kept) > 10 and len(fresh) >= 4, errs
    assert max(kept) < 1e-3, f"update differs from AdamW at step {GROW_AT + 1} by {max(kept):.2e} of its size"
    assert max(reset) > 0.1, "a reset step would give the same update: the test cannot tell"
    assert max(fresh) < 1e-3, f"fresh elements: update differs from AdamW at step 1 by {max(fresh):.2e}"


def test_flops_samples_and_iterations_continue(inrun):
    recs = read_records(inrun / "log.jsonl")
    its = [r["iteration"] for r in recs if "loss" in r]
    assert its == list(range(1, ITERS + 1))
    st = O.read_common(str(inrun / "ckpt"))["train_state"]
    assert st["iteration"] == ITERS and st["consumed_train_samples"] == 8 * ITERS
    hist = {int(i): f for i, _loss, f in st["loss_history"]}
    assert sorted(hist) == list(range(1, ITERS + 1))
    B, s, h, V = 8, 32, 64, 512

    def flops(L):
        return 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * h * L))
    prev = 0.0
    for i in range(1, ITERS + 1):
        want = flops(2 if i <= GROW_AT else 4)
        assert hist[i] - prev == pytest.approx(want, rel=1e-9), f"iteration {i}"
        prev = hist[i]


def test_growth_after_a_resume_keeps_the_checkpoints_lr(tmp_path):
    """Resumed with another --lr (no --override-opt-param-scheduler), a run keeps its checkpoint's LR
    (Megatron's rule, as the start-up warning says) also after its next growth: constant 1e-3 throughout,
    not the flag's 2e-3 once the grown optimizer is built; with --override-opt-param-scheduler, the flag's
    2e-3 from the resume on (the checkpoint's param groups brought back 1e-3 until the next growth)."""
    from conftest import TINY_MOCK, run_cli

    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, rewarmup_iters: 0, eval_iters: 1}\n"
                   "    - {at_iteration: 4, width_factor: 2, rewarmup_iters: 0, eval_iters: 1}\n")
    log, ck = tmp_path / "m.jsonl", str(tmp_path / "ck")
    common = [*TINY_MOCK, "--train-iters", "6", "--lr-decay-style", "constant", "--config", str(cfg),
              "--log-file", str(log), "--save", ck, "--save-interval", "100"]
    run_cli(["train", *common, "--exit-interval", "3"])
    import shutil

    ck2 = str(tmp_path / "ck2")
    shutil.copytree(ck, ck2)  # iteration 3, for the second resume below
    r = run_cli(["train", *common, "--load", ck, "--lr", "2e-3"])
    assert "resuming with the checkpoint's LR schedule" in r.stdout + r.stderr
    lrs = {x["iteration"]: x["lr"] for x in read_records(log) if "lr" in x}
    assert [x["hidden_size"] for x in read_records(log) if "lr" in x][-2:] == [64, 64]  # grown at 4
    assert [lrs[i] for i in range(1, 7)] == pytest.approx([1e-3] * 6)
    # with --override-opt-param-scheduler the flags' 2e-3 from the resume on, before and after the growth
    log2 = tmp_path / "m2.jsonl"
    common = [*common[:common.index("--log-file")], "--log-file", str(log2), "--save", ck2, "--save-interval", "100"]
    run_cli(["train", *common, "--load", ck2, "--lr", "2e-3", "--override-opt-param-scheduler"])
    lrs = {x["iteration"]: x["lr"] for x in read_records(log2) if "lr" in x}
    assert [lrs[i] for i in range(4, 7)] == pytest.approx([2e-3] * 3)


def test_bf16_growth_without_distributed_optimizer(tmp_path):
    """Found as a new user: growing a bf16 run that does not use the distributed optimizer (in-run or
    `grow`) died with torch Adam's KeyError 'step' (megatron leaves out a step of 0 when it saves the
    grown target's state, and it was supplied only for fp32's flat optimizer state dict). The grown
    checkpoint must equal the oracle applied to the source: bf16 weights, fp32 masters, Adam moments."""
    from conftest import TINY_MOCK, run_cli

    src, dst = tmp_path / "src", tmp_path / "dst"
    run_cli(["train", *TINY_MOCK, "--model-family", "gpt2", "--bf16", "--train-iters", "2", "--save", str(src)])
    run_cli(["grow", "--load", str(src), "--save", str(dst), "--depth-factor", "2", "--depth-placement", "interleave",
             "--depth-init", "identity"])
    a = O.describe(O.read_common(str(src)))
    want = O.stacked(O.grow_state(O.read_tensors(str(src)), a, depth_map=[0, 0, 1, 1]))
    got = O.read_tensors(str(dst))
    for key, w in want.items():
        torch.testing.assert_close(got[key].float(), w.float(), rtol=0, atol=0, msg=key)
    assert got["decoder.layers.mlp.linear_fc1.weight"].dtype == torch.bfloat16
    assert any(k.startswith("optimizer.state.fp32_param.") for k in want)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") and got[k].abs().max() > 0 for k in want)
    # the same growth inside a run
    y = tmp_path / "stage.yaml"
    y.write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, eval_iters: 1}\n")
    log = tmp_path / "inrun.jsonl"
    run_cli(["train", *TINY_MOCK, "--model-family", "gpt2", "--bf16", "--train-iters", "3", "--config", str(y),
             "--log-file", str(log)])
    steps = {r["iteration"]: r for r in read_records(log) if "loss" in r}
    assert steps[3]["num_layers"] == 4 and math.isfinite(steps[3]["loss"])
