"""Slope triggers (Shen et al. 2022): the estimator on curves with known derivatives, noise, and a
run in which a slope trigger grows the model and a resumed run grows it at the same iteration.

Oracles: the analytic slope of L(C) = A + B C^-a, d log L / d log C = -a B C^-a / (A + B C^-a),
and of Kaplan's L(N, S) at fixed N; for the run, a per-window numpy polyfit written here."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from conftest import read_records, run_cli
from megatron_staged.staging.triggers import THRESHOLDS, SlopeTrigger, windowed_slopes


def saturating_curve(A=3.0, B=17.4, a=0.5, n=20000, unit=1e9):
    return [(unit * i, A + B * i ** -a) for i in range(1, n + 1)]


def crossing(threshold, A=3.0, B=17.4, a=0.5):
    """C (in units) where -a B C^-a / (A + B C^-a) = threshold."""
    q = -threshold / a
    return (B * (1 - q) / (q * A)) ** (1 / a)


@pytest.mark.parametrize("name", ["depth", "width", "depth+width", "optimality"])
def test_fires_where_the_analytic_slope_crosses_the_paper_threshold(name):
    th = THRESHOLDS[name]
    hit = SlopeTrigger(th, patience=1).first_firing(saturating_curve())
    assert hit is not None
    # the slope it reports is the analytic slope at the compute it refers to (the window's centroid)
    x = hit["slope_compute"] / 1e9
    analytic = -0.5 * 17.4 * x ** -0.5 / (3.0 + 17.4 * x ** -0.5)
    assert hit["slope"] == pytest.approx(analytic, rel=0.03)  # second-order window bias
    assert x == pytest.approx(crossing(th), rel=0.05)
    assert hit["slope"] > th >= hit["slope_min"]


def test_kaplan_curve_at_fixed_size():
    """L(S) = (Nc/N)^0.076 + (Sc/S)^0.76: d log L / d log S = -0.76 (Sc/S)^0.76 / L."""
    n_params, s_c, n_c = 1e8, 2.1e3, 8.8e13
    ln = (n_c / n_params) ** 0.076
    curve = [(6 * n_params * 512 * s, ln + (s_c / s) ** 0.76) for s in range(1, 60001)]
    hit = SlopeTrigger(THRESHOLDS["depth"], patience=1).first_firing(curve)
    s = hit["slope_compute"] / (6 * n_params * 512)
    analytic = -0.76 * (s_c / s) ** 0.76 / (ln + (s_c / s) ** 0.76)
    assert hit["slope"] == pytest.approx(analytic, rel=0.03)  # second-order window bias
    # where the analytic slope equals the threshold: (Sc/S)^0.76 = q ln / (1 - q), q = -th / 0.76
    q = -THRESHOLDS["depth"] / 0.76
    s_star = s_c / (q * ln / (1 - q)) ** (1 / 0.76)
    assert s == pytest.approx(s_star, rel=0.05)


@pytest.mark.parametrize("seed", range(5))
def test_noise_does_not_fire_early(seed):
    """1% multiplicative loss noise (std), patience 3: fires within 10% of the noiseless point,
    never before 0.9x of it."""
    rnd = random.Random(seed)
    th = THRESHOLDS["width"]
    noisy = [(c, v * math.exp(rnd.gauss(0.0, 0.01))) for c, v in saturating_curve()]
    hit = SlopeTrigger(th, patience=3).first_firing(noisy)
    assert hit is not None
    assert 0.9 * crossing(th) <= hit["slope_compute"] / 1e9 <= 1.1 * crossing(th)


def test_no_firing_before_the_minimum_or_on_a_straight_power_law():
    # a pure power law has one slope everywhere: nothing to detect
    straight = [(1e9 * i, 10.0 * i ** -0.04) for i in range(1, 5000)]
    assert SlopeTrigger(-0.05, patience=1).first_firing(straight) is None
    # the slope starts flat (warm-up), steepens, then flattens: it must not fire on the early flat part
    curve = [(1e9 * i, 8.0 - 4.0 * (1 - math.exp(-i / 400.0))) for i in range(1, 6000)]
    _, s = windowed_slopes(curve, 2.0, 10)
    i_min = int(np.nanargmin(s))
    hit = SlopeTrigger(-0.05, patience=1).first_firing(curve)
    assert hit is not None and hit["index"] > i_min and s[hit["index"]] > -0.05


def test_windowed_slope_against_polyfit():
    rnd = random.Random(1)
    curve = [(1e6 * i, 5.0 * i ** -0.1 * math.exp(rnd.gauss(0, 0.02))) for i in range(1, 400)]
    _, s = windowed_slopes(curve, 2.0, 10)
    for end in (20, 99, 250, 398):
        c_end = curve[end][0]
        window = [(c, v) for c, v in curve[:end + 1] if c >= c_end / 2.0]
        ref = np.polyfit(np.log10([c for c, _ in window]), np.log10([v for _, v in window]), 1)[0]
        assert s[end] == pytest.approx(ref, abs=1e-9)


# ---- in a run --------------------------------------------------------------------------------------

TINY = ["--mock-data", "--model-family", "gpt2", "--num-layers", "2", "--hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "100", "--log-interval", "10", "--eval-iters", "1", "--progress-bar", "off",
        "--lr", "3e-3", "--lr-warmup-iters", "5", "--seed", "7", "--eval-interval", "25"]


def polyfit_slopes(curve, ratio=2.0, min_points=5):
    out = []
    for end, (c_end, _) in enumerate(curve):
        window = [(c, v) for c, v in curve[:end + 1] if c >= c_end / ratio]
        out.append(np.polyfit(np.log10([c for c, _ in window]), np.log10([v for _, v in window]), 1)[0]
                   if len(window) >= min_points else math.nan)
    return out


def test_slope_trigger_grows_in_run_and_again_after_resume(tmp_path):
    # 1. the curve without growth; the threshold is chosen from it so the trigger fires mid-run
    base = tmp_path / "base.jsonl"
    run_cli(["train", *TINY, "--log-file", str(base)])
    recs = [r for r in read_records(base) if "loss" in r]
    curve = [(r["flops_so_far"], r["loss"]) for r in recs]
    s = polyfit_slopes(curve)
    i_min = int(np.nanargmin(s))
    later = max(s[i_min:])
    assert later > s[i_min] + 0.02, "the test curve must flatten after its steepest point"
    th = float(s[i_min] + 0.5 * (later - s[i_min]))
    run = [k for k in range(i_min + 2, len(s)) if all(s[j] > th for j in (k - 2, k - 1, k))]
    expected = recs[run[0]]["iteration"]

    # 2. the staged run grows exactly there (the curve up to the growth is the same run's)
    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {trigger: slope, depth_factor: 2, slope_threshold: %r}\n"
                   "  slope_min_points: 5\n" % th)
    log = tmp_path / "staged.jsonl"
    run_cli(["train", *TINY, "--config", str(cfg), "--log-file", str(log), "--save", str(tmp_path / "ck")])
    events = [r for r in read_records(log) if r.get("event") in ("trigger", "growth")]
    assert [(e["event"], e["iteration"]) for e in events] == [("trigger", expected), ("growth", expected)]
    assert events[0]["slope"] > th and events[0]["threshold"] == pytest.approx(th)
    assert events[1]["eval_loss_before"] == pytest.approx(events[1]["eval_loss_after"], abs=1e-5)
    shown = run_cli(["report", str(log), "--baseline", str(base), "--out", str(tmp_path / "r.png")]).stdout
    assert "stage 0: 2 layers x 64" in shown and "stage 1: 4 layers x 64" in shown
    assert f"stage 0: 2 layers x 64: {expected} iterations" in shown
    assert f"growth at iteration {expected} (" in shown and "-> 4 layers x 64 (PRE-GROWTH slope trigger: slope" in shown

    # 3. interrupted two iterations before, resumed: it fires at the same iteration
    ck = tmp_path / "ck_resume"
    run_cli(["train", *TINY, "--config", str(cfg), "--save", str(ck), "--exit-interval", str(expected - 2)])
    log2 = tmp_path / "resumed.jsonl"
    run_cli(["train", *TINY, "--config", str(cfg), "--load", str(ck), "--save", str(ck), "--log-file", str(log2)])
    grown = [r["iteration"] for r in read_records(log2) if r.get("event") == "growth"]
    assert grown == [expected]
    meta = json.loads(json.dumps([r for r in read_records(log2) if r.get("event") == "growth"][0]))
    assert meta["num_layers"] == 4


def test_compute_axis_is_executed_flops_when_layers_are_dropped():
    """With RaPTr the trainer records executed-layer FLOPs; the trigger's compute axis must be those
    (plus the from-scratch offset after a growth), not full-model FLOPs per iteration."""
    from megatron_staged.staging.triggers import stage_curve

    full, step0, since = 1e9, 50, 100
    # a RaPTr-like schedule: kept fraction 0.5 for the first 4000 steps after the growth, then 0.75, then 1
    history, flops = [], 7e12  # FLOPs so far at the growth (any earlier models)
    history.append((since, 4.0, flops))
    executed = []
    for i in range(1, 20001):
        frac = 0.5 if i <= 4000 else (0.75 if i <= 10000 else 1.0)
        flops += frac * full
        executed.append(flops - 7e12)
    # the loss is a saturating power law of the compute actually spent (offset by the growth's placement)
    comp = [full * step0 + e for e in executed]
    history += [(since + i, 3.0 + 17.4 * (c / 1e9) ** -0.5, f)
                for i, (c, f) in enumerate(zip(comp, [7e12 + e for e in executed]), start=1)]
    its, curve = stage_curve(history, since, full, step0)
    assert its == list(range(since + 1, since + 20001))
    assert [c for c, _ in curve] == pytest.approx(comp, rel=1e-12)
    # the same from the growth's recorded FLOPs when the history no longer reaches back to it
    assert stage_curve(history[1:], since, full, step0, flops_at_start=7e12) == (its, curve)
    hit = SlopeTrigger(THRESHOLDS["depth"], patience=1).first_firing(curve)
    assert hit["slope_compute"] / 1e9 == pytest.approx(crossing(THRESHOLDS["depth"]), rel=0.05)
    # the full-model axis (the old count) would misplace it
    naive = [(full * (step0 + i), v) for i, (_, v) in enumerate(curve, start=1)]
    wrong = SlopeTrigger(THRESHOLDS["depth"], patience=1).first_firing(naive)
    assert wrong is None or abs(its[wrong["index"]] - its[hit["index"]]) > 100
    # without dropped layers the axis is full FLOPs per iteration, as before
    plain = [(since, 4.0, 7e12)] + [(since + i, 3.0 + 1.0 / i, 7e12 + i * full) for i in range(1, 50)]
    assert [c for c, _ in stage_curve(plain, since, full, step0)[1]] == pytest.approx(
        [full * (step0 + i) for i in range(1, 50)])


def test_a_stage_that_never_ran_is_named_at_the_end(tmp_path):
    """A stage whose point the run never reached (here at_flops far beyond it) ends the run ungrown: say so,
    but not when the run stops early (--exit-interval), where a resume may still reach it."""
    from conftest import TINY_MOCK

    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_flops: 1.0e+30, depth_factor: 2}\n")
    full = run_cli(["train", *TINY_MOCK, "--train-iters", "3", "--config", str(cfg)])
    out = full.stdout + full.stderr
    assert "growth at iteration" not in out
    assert "note: staging.stages[0] never ran before --train-iters 3: at_flops 1e+30" in out, out[-2000:]
    early = run_cli(["train", *TINY_MOCK, "--train-iters", "3", "--exit-interval", "2", "--config", str(cfg)])
    assert "never ran" not in early.stdout + early.stderr


def test_stages_due_at_once_grow_at_the_same_iteration(tmp_path):
    """An at_flops point already passed when the stage before it runs is due at once: both growths
    happen at that iteration (what `plan` and `--dry-run` print), not one a step late."""
    from conftest import TINY_MOCK

    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, eval_iters: 1}\n"
                   "    - {at_flops: 1.0, width_factor: 2, eval_iters: 1}\n")
    log, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    r = run_cli(["train", *TINY_MOCK, "--train-iters", "3", "--config", str(cfg), "--log-file", str(log),
                 "--save", str(ckpt)])
    growths = [r for r in read_records(log) if r.get("event") == "growth"]
    assert [(g["iteration"], g["num_layers"], g["hidden_size"]) for g in growths] == [(2, 4, 32), (2, 4, 64)]
    assert [r["hidden_size"] for r in read_records(log) if "elapsed_ms" in r] == [32, 32, 64]
    # one checkpoint write for both growths at iteration 2 (the state after both), then the final one
    saves = [l for l in r.stdout.splitlines() if "saved checkpoint at iteration" in l]
    assert [int(l.split("iteration")[1].split()[0]) for l in saves] == [2, 3], r.stdout[-3000:]
    import torch
    common = torch.load(ckpt / "iter_0000002" / "common.pt", weights_only=False)
    assert (common["args"].num_layers, common["args"].hidden_size) == (4, 64)  # Megatron-LM's args Namespace
    assert len(common["train_state"]["stage_history"]) == 2
