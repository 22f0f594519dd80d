"""RaPTr and progressive layer dropping (megatron_staged.subnet): schedules, and on 4 gloo ranks
(one torchrun launch, tests/workers/raptr_worker.py): every rank of a replica drops the same
layers and really skips them, keep-probability 1 is the full model, dropped layers == the model
without them (loss and gradients), the same losses at every TP/PP/DP layout (with the distributed
optimizer and overlapped grad reduction), the optimizer leaves dropped layers alone, resume
reproduces the drops, and growth stages can follow."""
from __future__ import annotations

import json
import math

import pytest

from conftest import ROOT, read_records, torchrun
from megatron_staged.config import parse_config, validate
from megatron_staged.errors import UserError
from megatron_staged.subnet.schedule import build_schedule

# ---- schedules (no processes) ---------------------------------------------------------------------


def _cfg(*flags, world=1):
    cfg = parse_config(["--mock-data", "--num-layers", "12", "--train-iters", "400", *flags])
    validate(cfg, world)
    return cfg


def test_raptr_stages_from_expected_active_layers():
    """6-8-10-12 of 12 with first,last fixed: p = (k-2)/10, four equal stages, all layers after."""
    s = build_schedule(_cfg("--raptr-stages", "6,8,10,12"))
    assert [st.keep_prob for st in s.stages] == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert [(st.start, st.iters) for st in s.stages] == [(0, 100), (100, 100), (200, 100), (300, 100)]
    p = s.keep_probs(150)
    assert p[0] == 1.0 and p[11] == 1.0 and all(x == pytest.approx(0.6) for x in p[1:11])
    assert s.expected_active(150) == pytest.approx(8.0)
    assert float(s.keep_probs(400).min()) == 1.0
    assert bool(s.mask(450).all())


def test_raptr_stage_split_by_flops_gives_cheaper_stages_more_iterations():
    s = build_schedule(_cfg("--raptr-stages", "6,8,10,12", "--raptr-stage-split", "flops"))
    lengths = [st.iters for st in s.stages]
    assert sum(lengths) == 400 and lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    from megatron_staged.training.flops import flops_per_iteration
    cfg = _cfg()
    cfg.model.padded_vocab_size = 0
    per_stage = [n * flops_per_iteration(cfg.model, 1, num_layers=st.expected_active) for n, st in zip(lengths, s.stages)]
    assert max(per_stage) / min(per_stage) < 1.02  # equal FLOPs up to rounding to whole iterations


def test_draws_follow_keep_probability_and_are_pure():
    """Empirical keep-rate ~ p; the same (seed, iteration, micro-batch) always gives the same mask."""
    s = build_schedule(_cfg("--raptr-keep-probs", "0.3", "--raptr-fixed-layers", "none",
                            "--raptr-draw-per", "micro-batch"))
    import torch
    m = torch.stack([s.mask(it, g) for it in range(200) for g in range(4)]).double()
    assert float(m.mean()) == pytest.approx(0.3, abs=0.02)
    assert torch.equal(s.mask(17, 3), s.mask(17, 3)) and not torch.equal(
        torch.stack([s.mask(17, g) for g in range(8)]), torch.stack([s.mask(18, g) for g in range(8)]))
    it_mode = build_schedule(_cfg("--raptr-keep-probs", "0.3", "--raptr-fixed-layers", "none"))
    assert torch.equal(it_mode.mask(5, 0), it_mode.mask(5, 7))  # one draw per iteration


def test_pld_schedule_is_deepspeeds():
    """theta(t) = (1-theta_bar) exp(-gamma t) + theta_bar; p_l = 1 - (l/L)(1-theta)."""
    s = build_schedule(_cfg("--progressive-layer-drop", "--pld-theta", "0.5", "--pld-gamma", "0.01"))
    for t in (0, 50, 1000):
        theta = 0.5 * math.exp(-0.01 * t) + 0.5
        assert s.keep_probs(t).tolist() == pytest.approx([1 - (l / 12) * (1 - theta) for l in range(1, 13)])
    assert s.keep_probs(0).tolist() == pytest.approx([1.0] * 12)


def test_rescale_option():
    s = build_schedule(_cfg("--raptr-stages", "6,12", "--raptr-rescale"))
    assert s.scale(0)[5] == pytest.approx(1 / 0.4) and s.scale(0)[0] == 1.0
    assert float(build_schedule(_cfg("--raptr-stages", "6,12")).scale(0).max()) == 1.0  # default: c = 1


@pytest.mark.parametrize("flags,needle", [
    (["--raptr-stages", "1,12"], "--raptr-stages: 1 active layers is outside [2, 12]"),
    (["--raptr-stages", "6,x"], "--raptr-stages: cannot read"),
    (["--raptr-keep-probs", "1.5"], "--raptr-keep-probs: 1.5 is not a probability"),
    (["--raptr-stages", "6,12", "--raptr-keep-probs", "0.5"], "not both"),
    (["--raptr-stages", "6,12", "--raptr-stage-iters", "100"], "--raptr-stage-iters has 1 stages"),
    (["--raptr-stages", "6,12", "--raptr-stage-iters", "2.7,3.9"], "--raptr-stage-iters: 2.7 is not a whole number"),
    (["--raptr-stages", "6,12", "--raptr-fixed-layers", "0"], "--raptr-fixed-layers: layer 0 is not in 1..12"),
    (["--raptr-stages", "6,12", "--progressive-layer-drop"], "exclude each other"),
    (["--raptr-keep-probs", "0,1", "--raptr-rescale"], "--raptr-rescale divides"),
])
def test_bad_layer_drop_flags_one_line_error(flags, needle):
    with pytest.raises(UserError) as e:
        _cfg(*flags)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_overlap_with_per_micro_batch_draws_refused_at_dp_gt_1():
    with pytest.raises(UserError, match="--raptr-draw-per micro-batch with --overlap-grad-reduce"):
        _cfg("--raptr-keep-probs", "0.5", "--raptr-draw-per", "micro-batch", "--overlap-grad-reduce", world=2)


def test_yaml_section_and_list_values(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("subnet:\n  raptr_stages: [6, 8, 10, 12]\n  raptr_fixed_layers: first\n")
    cfg = parse_config(["--config", str(y), "--mock-data", "--num-layers", "12", "--train-iters", "40"])
    validate(cfg, 1)
    assert [round(st.expected_active) for st in build_schedule(cfg).stages] == [6, 8, 10, 12]


# ---- multi-rank scenarios (one torchrun launch) -----------------------------------------------------

BASE = ["--model-family", "gpt2", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--log-interval", "1", "--eval-iters", "1",
        "--progress-bar", "off", "--vocab-size", "256", "--seed", "7",
        # layout-independent vocabulary padding: Megatron's default pads to a multiple of 128 x TP,
        # which gives TP1 and TP2 different models (here 257 -> 384 vs 512)
        "--vocab-padding", "lcm"]
DATA = ["--mock-data"]
DROP = ["--raptr-keep-probs", "0.5", "--raptr-fixed-layers", "none", "--train-iters", "4"]


def _lay(tp, pp, *extra):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]


LAYOUT_CASES = {  # name: (TP, PP, DP, extra flags); all on 4 ranks
    "tp1pp1dp4_distopt": _lay(1, 1, "--use-distributed-optimizer"),
    "tp2pp2dp1": _lay(2, 2),
    "tp1pp4dp1": _lay(1, 4),  # one layer per stage: whole stages are dropped (pass-through)
    "tp2pp1dp2_distopt_overlap": _lay(2, 1, "--use-distributed-optimizer", "--overlap-grad-reduce"),
    "tp1pp2dp2_overlap": _lay(1, 2, "--overlap-grad-reduce"),
    # interleaved 1F1B: 2 chunks of one layer per pipeline rank; with --overlap-param-gather the
    # all-gather of a chunk whose one layer is dropped is never waited for by megatron's pre-hooks
    "tp1pp2dp2_vp2_distopt_overlap_pg": _lay(1, 2, "--num-layers-per-virtual-pipeline-stage", "1",
                                             "--use-distributed-optimizer", "--overlap-grad-reduce",
                                             "--overlap-param-gather"),
}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    d = tmp_path_factory.mktemp("raptr")
    cases = [{"name": n, "kind": "train", "args": [*DROP, *a]} for n, a in LAYOUT_CASES.items()]
    cases += [
        {"name": "mb_tp1pp1dp4", "kind": "train", "args": [*DROP, "--raptr-draw-per", "micro-batch", *_lay(1, 1)]},
        {"name": "mb_tp2pp2dp1", "kind": "train", "args": [*DROP, "--raptr-draw-per", "micro-batch", *_lay(2, 2)]},
        # interleaved 1F1B runs the micro-batches of a step out of order across a rank's chunks
        {"name": "mb_tp1pp2dp2_vp2", "kind": "train",
         "args": [*DROP, "--raptr-draw-per", "micro-batch", *_lay(1, 2, "--num-virtual-stages-per-pipeline-rank", "2")]},
        # full recomputation runs a layer again in backward, after later micro-batches' forwards (1F1B)
        {"name": "mb_tp1pp2dp2_recompute", "kind": "train",
         "args": [*DROP, "--raptr-draw-per", "micro-batch", "--recompute-granularity", "full", "--recompute-method",
                  "uniform", "--recompute-num-layers", "1", *_lay(1, 2)]},
        {"name": "keep1", "kind": "train", "args": ["--raptr-keep-probs", "1", "--train-iters", "3", *_lay(2, 2)]},
        {"name": "full", "kind": "train", "args": ["--train-iters", "3", *_lay(2, 2)]},
        {"name": "no_skip", "kind": "train",
         "args": [*DROP, "--no-layer-drop-skip-optimizer-update", *_lay(1, 1, "--use-distributed-optimizer")]},
        {"name": "removed", "kind": "removed", "drop": [2, 3], "args": _lay(2, 1)},
        {"name": "resume", "kind": "resume", "iters": 6,
         "args": ["--raptr-stages", "2,3,4", *_lay(1, 2, "--use-distributed-optimizer")]},
    ]
    grow_yaml = d / "grow.yaml"
    grow_yaml.write_text("staging:\n  stages:\n    - {at_iteration: 3, depth_factor: 2, eval_iters: 1}\n")
    cases.append({"name": "then_grow", "kind": "train",
                  "args": ["--config", str(grow_yaml), "--raptr-keep-probs", "0.5", "--raptr-fixed-layers", "none",
                           "--train-iters", "5", *_lay(1, 2)]})
    spec = d / "cases.json"
    spec.write_text(json.dumps({"data": DATA, "base": BASE, "out_dir": str(d), "cases": cases}))
    out = d / "results.json"
    torchrun([str(spec), str(out)], nproc=4, script=str(ROOT / "tests/workers/raptr_worker.py"), timeout=900)
    return json.loads(out.read_text())


def _losses(rank_records):
    return {r["iteration"]: r["loss"] for r in read_records(rank_records[0]["log"]) if "loss" in r}


def test_every_rank_of_a_replica_drops_the_same_layers_and_skips_them(scenarios):
    """Per (iteration, micro-batch): the same mask on all TP/PP ranks (and DP replicas, drawn per
    iteration); the layers that really ran on a rank are exactly its layers the mask keeps."""
    for name in [*LAYOUT_CASES, "mb_tp1pp1dp4", "mb_tp2pp2dp1", "mb_tp1pp2dp2_vp2"]:
        ranks = scenarios[name]
        per_mb = name.startswith("mb_")
        ref = ranks[0]["masks"]
        assert len(ref) == 4, name
        for r in ranks:
            if not per_mb:
                assert r["masks"] == ref, f"{name}: rank {r['rank']} drew other masks"
            ran = {(it, mb, l) for it, mb, l in r["executed"]}
            for it, masks in r["masks"].items():
                n_local_mb = 8 // 2 // r["dp_size"]
                for mb in range(n_local_mb):
                    m = masks[0] if len(masks) == 1 else masks[mb * r["dp_size"] + r["dp"]]
                    want = {l for l in r["layers"] if m[l - 1]}
                    got = {l for (i, b, l) in ran if i == int(it) and b == mb}
                    assert got == want, f"{name} rank {r['rank']} iteration {it} mb {mb}: ran {got}, mask {m}"
        if per_mb:  # replicas of a step differ, and the ranks of one replica agree
            assert all(r["masks"] == ref for r in ranks)
    some_dropped = [sum(1 - x for x in m[0]) for m in scenarios["tp1pp4dp1"][0]["masks"].values()]
    assert max(some_dropped) >= 1, "the scenario should drop layers (whole PP stages at PP4)"


def test_same_losses_at_every_layout(scenarios):
    ref = _losses(scenarios["tp1pp1dp4_distopt"])
    assert sorted(ref) == [1, 2, 3, 4]
    for name in LAYOUT_CASES:
        got = _losses(scenarios[name])
        for it in ref:
            assert got[it] == pytest.approx(ref[it], rel=1e-5), f"{name} iteration {it}"
    a = _losses(scenarios["mb_tp1pp1dp4"])
    for name in ("mb_tp2pp2dp1", "mb_tp1pp2dp2_vp2", "mb_tp1pp2dp2_recompute"):
        b = _losses(scenarios[name])
        for it in a:  # per-micro-batch draws are keyed by the global micro-batch: layout-free too
            assert b[it] == pytest.approx(a[it], rel=1e-5), f"micro-batch draws, {name} iteration {it}"
    assert any(abs(a[it] - ref[it]) > 1e-6 for it in ref), "per-micro-batch draws should differ from per-iteration"


def test_keep_probability_one_is_the_full_model_exactly(scenarios):
    assert _losses(scenarios["keep1"]) == _losses(scenarios["full"])


def test_dropped_layers_equal_the_model_without_them(scenarios):
    for r in scenarios["removed"]:
        assert r["loss_full"] == pytest.approx(r["loss_ref"], rel=1e-6, abs=0)
        assert r["compared"] > 0 and r["grad_rel_diff"] < 1e-5
        assert r["dropped_grad_max"] == 0.0


def test_optimizer_leaves_layers_without_gradient_unchanged(scenarios):
    """Default: no momentum / weight-decay drift on dropped layers; the opt-out does drift.
    (Not measurable per step with --overlap-param-gather: a step's update of the shards other ranks
    own arrives with the next step's all-gather, which can be a step that drops the layer.)"""
    for name in LAYOUT_CASES:
        if "--overlap-param-gather" in LAYOUT_CASES[name]:
            continue
        for r in scenarios[name]:
            c = r["checks"]
            assert c["moved_dropped"] == 0 and c["unchanged_kept"] == 0, f"{name} rank {r['rank']}: {c}"
    assert sum(r["checks"]["unchanged_dropped"] for r in scenarios["tp1pp1dp4_distopt"]) > 0
    assert sum(r["checks"]["moved_dropped"] for r in scenarios["no_skip"]) > 0


def test_flops_and_log_count_executed_layers(scenarios):
    recs = read_records(scenarios["tp2pp2dp1"][0]["log"])
    steps = [r for r in recs if "loss" in r]
    full = [r for r in read_records(scenarios["full"][0]["log"]) if "loss" in r]
    per_full_step = full[0]["flops_so_far"]
    prev = 0.0
    for r in steps:
        step_flops = r["flops_so_far"] - prev
        prev = r["flops_so_far"]
        assert r["active_layers"] <= 4
        # the logit term is a fixed part of a step; layer terms are linear in executed layers
        assert step_flops <= per_full_step * (1 + 1e-9)
        if r["active_layers"] < 4:
            assert step_flops < per_full_step
    lows = [r for r in steps if r["active_layers"] < 4]
    assert lows, "some step should have dropped a layer"
    stage_events = [r for r in recs if r.get("event") == "raptr_stage"]
    assert stage_events and stage_events[0]["iteration"] == 0


def test_resume_reproduces_the_drops(scenarios):
    r = scenarios["resume"][0]
    assert sorted(map(int, r["first"])) == [1, 2, 3] and sorted(map(int, r["second"])) == [4, 5, 6]
    for it, loss in r["straight"].items():
        assert (r["first"] if int(it) <= 3 else r["second"])[it] == loss, f"iteration {it}"
    assert r["active_resumed"] == r["active_straight"]


def test_growth_stage_after_raptr(scenarios):
    recs = read_records(scenarios["then_grow"][0]["log"])
    steps = {r["iteration"]: r for r in recs if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert steps[3]["num_layers"] == 4 and steps[4]["num_layers"] == 8
    assert steps[4]["active_layers"] == 8 and steps[5]["active_layers"] == 8  # schedule ended at the growth
    assert any(r.get("event") == "growth" for r in recs)
    assert all(math.isfinite(s["loss"]) for s in steps.values())


def test_raptr_schedule_and_growth_stages(tmp_path):
    """The schedule ends at the first growth by default, must not run past it, and needs
    --raptr-iters when that growth is placed by FLOPs or a slope trigger."""
    def cfg_with(stage, *flags):
        y = tmp_path / "g.yaml"
        y.write_text("staging:\n  stages:\n    - " + stage + "\n")
        return _cfg("--config", str(y), "--raptr-stages", "6,12", *flags)

    s = build_schedule(cfg_with("{at_iteration: 100, depth_factor: 2}"))
    assert s.span == 100 and [st.iters for st in s.stages] == [50, 50]
    with pytest.raises(UserError, match="past the first growth stage at iteration 100"):
        cfg_with("{at_iteration: 100, depth_factor: 2}", "--raptr-iters", "200")
    with pytest.raises(UserError, match="give --raptr-iters"):
        cfg_with("{at_flops: 1.0e+12, depth_factor: 2}")
    assert build_schedule(cfg_with("{at_flops: 1.0e+12, depth_factor: 2}", "--raptr-iters", "80")).span == 80


@pytest.mark.parametrize("flags,warned", [
    (["--raptr-keep-probs", "0.5", "--train-iters", "10"], True),   # would drop layers from iteration 3 on
    (["--train-iters", "10"], False),                                # same (no) layer dropping as saved
    (["--raptr-keep-probs", "0.5", "--raptr-iters", "2", "--train-iters", "10"], False),  # schedule over by 2
    (["--progressive-layer-drop", "--train-iters", "10"], True),
])
def test_resume_with_other_layer_drop_flags_warns(tiny_checkpoint, capsys, flags, warned):
    """Found as a new user: resuming a RaPTr run without its flags (or with other ones) silently
    trained other subnetworks than the saved run. tiny_checkpoint was trained to iteration 2 without
    layer dropping."""
    from conftest import TINY_MOCK
    from megatron_staged.preflight import preflight

    cfg = parse_config([*TINY_MOCK, "--load", str(tiny_checkpoint), *flags])
    preflight(cfg, "train")
    err = capsys.readouterr().err
    assert ("other layer-drop flags" in err) == warned, err
    if warned:
        line = next(l for l in err.splitlines() if "other layer-drop flags" in l)
        assert "resuming at iteration 2" in line and "the checkpoint has" in line
