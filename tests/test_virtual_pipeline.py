"""Interleaved 1F1B (virtual pipeline stages, Megatron-LM's --num-layers-per-virtual-pipeline-stage /
--num-virtual-stages-per-pipeline-rank): training, checkpoints across layouts and in-run depth
growth at a virtual-pipeline layout, each compared with the same run at PP 1 (no pipeline, no
virtual-stage code), which is the oracle; and the bad values, each refused with one line before
anything is built."""
from __future__ import annotations

import json

import pytest

from megatron_staged.config import parse_config, validate
from megatron_staged.errors import UserError
from megatron_staged.staging.stages import plan_stages
from megatron_staged.training.state import TrainState

from conftest import ROOT, torchrun

BASE = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--num-layers", "4",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "1", "--train-iters", "4",
        "--log-interval", "1", "--eval-iters", "1", "--progress-bar", "off", "--use-distributed-optimizer"]
PP1 = ["--pipeline-model-parallel-size", "1"]
VP_LAYERS = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]  # 2 chunks of 1
VP_STAGES = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]
TOL = 2e-5  # float32 round-off: the layouts sum the same terms in another order


@pytest.fixture(scope="module")
def vp_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vpp")
    (d / "grow.yaml").write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, eval_iters: 1}\n")
    (d / "grow_into_vp.yaml").write_text(
        "staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, eval_iters: 1, "
        "target_pipeline_model_parallel_size: 2, target_num_virtual_stages_per_pipeline_rank: 2}\n")
    grow = ["--config", str(d / "grow.yaml")]
    muon = [*BASE, "--no-use-distributed-optimizer", "--optimizer", "muon", "--train-iters", "3"]
    cases = [
        {"name": "pp1", "flags": [*BASE, *PP1, "--save", f"{d}/pp1", "--save-interval", "2"]},
        {"name": "vp", "flags": [*BASE, *VP_LAYERS, "--save", f"{d}/vp", "--save-interval", "2"]},
        # 4 micro-batches run back to back per virtual stage (megatron's default group is PP = 2)
        {"name": "vp_group4", "flags": [*BASE, *VP_LAYERS, "--microbatch-group-size-per-virtual-pipeline-stage", "4"]},
        {"name": "vp_to_pp1", "flags": [*BASE, *PP1, "--load", f"{d}/vp/iter_0000002"]},
        {"name": "pp1_to_vp", "flags": [*BASE, *VP_STAGES, "--load", f"{d}/pp1/iter_0000002"]},
        {"name": "grow_pp1", "flags": [*BASE, *PP1, *grow]},
        {"name": "grow_vp", "flags": [*BASE, *VP_LAYERS, *grow]},
        {"name": "grow_into_vp", "flags": [*BASE, *PP1, "--config", str(d / "grow_into_vp.yaml")]},
        {"name": "muon_pp1", "flags": [*muon, *PP1]},
        {"name": "muon_vp", "flags": [*muon, *VP_STAGES]},
    ]
    # convert and offline grow into and out of interleaved layouts; each result evaluated
    vp2, pp2 = f"{d}/vp/iter_0000002", f"{d}/pp1/iter_0000002"
    conv, grow_tool = ["convert", "--no-optimizer"], ["grow"]
    ev = [*BASE, "--no-load-optim", "--no-load-rng"]
    cases += [
        {"name": "c_pp1", "kind": "tool", "flags": [*conv, "--load", vp2, "--save", f"{d}/c_pp1",
                                                   "--target-pipeline-model-parallel-size", "1"]},
        {"name": "c_vp", "kind": "tool", "flags": [*conv, "--load", pp2, "--save", f"{d}/c_vp",
                                                  "--target-pipeline-model-parallel-size", "2",
                                                  "--target-num-virtual-stages-per-pipeline-rank", "2"]},
        {"name": "g_vp", "kind": "tool", "flags": [*grow_tool, "--load", vp2, "--save", f"{d}/g_vp", "--depth-factor", "2"]},
        {"name": "g_into_vp", "kind": "tool", "flags": [*grow_tool, "--load", pp2, "--save", f"{d}/g_into_vp",
                                                       "--depth-factor", "2", "--target-pipeline-model-parallel-size", "2",
                                                       "--target-num-layers-per-virtual-pipeline-stage", "2"]},
        {"name": "e_pp1", "kind": "eval", "flags": [*ev, *PP1, "--load", pp2]},
        {"name": "e_vp", "kind": "eval", "flags": [*ev, *VP_STAGES, "--load", vp2]},
        {"name": "e_c_pp1", "kind": "eval", "flags": [*ev, *PP1, "--load", f"{d}/c_pp1"]},
        {"name": "e_c_vp", "kind": "eval", "flags": [*ev, *VP_STAGES, "--load", f"{d}/c_vp"]},
        {"name": "e_g_vp", "kind": "eval", "flags": [*ev, *PP1, "--load", f"{d}/g_vp"]},
        {"name": "e_g_into_vp", "kind": "eval", "flags": [*ev, *VP_LAYERS[:2], "--num-layers-per-virtual-pipeline-stage", "2",
                                                         "--load", f"{d}/g_into_vp"]},
    ]
    (d / "cases.json").write_text(json.dumps(cases))
    torchrun([str(d / "cases.json"), str(d / "results.jsonl")], nproc=2, timeout=900,
             script=str(ROOT / "tests" / "workers" / "vpp_worker.py"))
    return {r["name"]: r for r in map(json.loads, (d / "results.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def vp_runs_4(tmp_path_factory):
    """4 processes: PP4 x 2 virtual stages with --no-overlap-p2p-communication (megatron's batched p2p),
    TP2 PP2 VP2, PP2 VP2 DP2 with overlapped grad reduce and param gather, and the PP1 (DP4) oracles; 8 layers (the padded vocabulary made TP-independent)."""
    d = tmp_path_factory.mktemp("vpp4")
    base = [*BASE, "--num-layers", "8", "--train-iters", "3", "--vocab-padding", "lcm"]
    cases = [
        {"name": "pp1", "flags": [*base, *PP1]},
        {"name": "pp4_vp2_batched", "flags": [*base, "--pipeline-model-parallel-size", "4",
                                             "--num-virtual-stages-per-pipeline-rank", "2",
                                             "--no-overlap-p2p-communication"]},
        {"name": "tp2_pp2_vp2", "flags": [*base, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                                         "2", "--num-layers-per-virtual-pipeline-stage", "2"]},
        {"name": "pp1_gbs8", "flags": [*base, *PP1, "--global-batch-size", "8"]},
        {"name": "pp2_vp2_dp2_overlap", "flags": [*base, *VP_STAGES, "--global-batch-size", "8", "--overlap-grad-reduce",
                                                 "--overlap-param-gather"]},
    ]
    (d / "cases.json").write_text(json.dumps(cases))
    torchrun([str(d / "cases.json"), str(d / "results.jsonl")], nproc=4, timeout=900,
             script=str(ROOT / "tests" / "workers" / "vpp_worker.py"))
    return {r["name"]: r for r in map(json.loads, (d / "results.jsonl").read_text().splitlines())}


def test_interleaved_training_at_pp4_batched_p2p_tp2_and_dp2_overlap_matches_pp1(vp_runs_4):
    r = vp_runs_4
    assert (r["pp4_vp2_batched"]["layout"], r["pp4_vp2_batched"]["chunks"]) == ("TP1 PP4 VP2 DP1", 2)
    assert (r["tp2_pp2_vp2"]["layout"], r["tp2_pp2_vp2"]["chunks"]) == ("TP2 PP2 VP2 DP1", 2)
    for name in ("pp4_vp2_batched", "tp2_pp2_vp2"):
        _close(r[name]["losses"], r["pp1"]["losses"], range(1, 4))
    # DP2 with the distributed optimizer's overlapped grad reduce / param gather (one sync per chunk)
    assert r["pp2_vp2_dp2_overlap"]["layout"] == "TP1 PP2 VP2 DP2"
    _close(r["pp2_vp2_dp2_overlap"]["losses"], r["pp1_gbs8"]["losses"], range(1, 4))


def _close(a: dict, b: dict, iters) -> None:
    for i in iters:
        assert a[str(i)] == pytest.approx(b[str(i)], rel=TOL, abs=TOL), (i, a, b)


def test_interleaved_training_matches_pp1(vp_runs):
    pp1, vp = vp_runs["pp1"], vp_runs["vp"]
    assert (vp["layout"], vp["chunks"]) == ("TP1 PP2 VP2 DP1", 2)  # megatron's interleaved schedule ran
    assert (pp1["layout"], pp1["chunks"]) == ("TP1 PP1 DP2", 1)
    _close(vp["losses"], pp1["losses"], range(1, 5))
    assert len(set(pp1["losses"].values())) == 4  # the model trains (the losses move)
    assert vp["vp_group"] == 2  # megatron-core's default micro-batch group: PP
    group4 = vp_runs["vp_group4"]
    assert (group4["layout"], group4["vp_group"]) == ("TP1 PP2 VP2 DP1", 4)
    _close(group4["losses"], pp1["losses"], range(1, 5))


def test_interleaved_training_with_muon_matches_pp1(vp_runs):
    assert vp_runs["muon_vp"]["chunks"] == 2
    _close(vp_runs["muon_vp"]["losses"], vp_runs["muon_pp1"]["losses"], range(1, 4))


def test_resume_across_interleaved_and_plain_layouts(vp_runs):
    # saved at PP2 VP2, resumed at PP1; saved at PP1, resumed at PP2 VP2 (--num-virtual-stages-per-pipeline-rank)
    assert vp_runs["vp_to_pp1"]["layout"] == "TP1 PP1 DP2"
    _close(vp_runs["vp_to_pp1"]["losses"], vp_runs["vp"]["losses"], (3, 4))
    assert vp_runs["pp1_to_vp"]["layout"] == "TP1 PP2 VP2 DP1"
    _close(vp_runs["pp1_to_vp"]["losses"], vp_runs["pp1"]["losses"], (3, 4))


def test_depth_growth_at_and_into_interleaved_layouts(vp_runs):
    ref = vp_runs["grow_pp1"]
    for name in ("grow_vp", "grow_into_vp"):
        r = vp_runs[name]
        (stage,) = r["stages"]
        assert stage["after"] == pytest.approx(stage["before"], abs=TOL)  # identity growth keeps the function
        assert stage["after"] == pytest.approx(ref["stages"][0]["after"], abs=TOL)
        _close(r["losses"], ref["losses"], range(1, 5))  # and trains on exactly as the grown PP1 model
    # --num-layers-per-virtual-pipeline-stage 1 is kept: 8 layers over PP2 are 4 chunks of one layer
    assert (vp_runs["grow_vp"]["final_layout"], vp_runs["grow_vp"]["final_chunks"]) == ("TP1 PP2 VP4 DP1", 4)
    g = vp_runs["grow_into_vp"]
    assert (g["layout"], g["final_layout"], g["final_chunks"]) == ("TP1 PP1 DP2", "TP1 PP2 VP2 DP1", 2)
    assert g["stages"][0]["to"]["vp"] == 2 and g["stages"][0]["to"]["num_layers"] == 8


def test_convert_and_offline_grow_into_and_out_of_interleaved_layouts(vp_runs):
    e = {k: vp_runs[k]["eval"] for k in ("e_pp1", "e_vp", "e_c_pp1", "e_c_vp", "e_g_vp", "e_g_into_vp")}
    assert vp_runs["e_vp"]["chunks"] == 2 and vp_runs["e_c_vp"]["chunks"] == 2
    assert e["e_vp"] == pytest.approx(e["e_pp1"], abs=TOL)  # the two runs trained the same model
    assert e["e_c_pp1"] == pytest.approx(e["e_vp"], abs=TOL)  # PP2 VP2 -> PP1
    assert e["e_c_vp"] == pytest.approx(e["e_pp1"], abs=TOL)  # PP1 -> PP2 VP2
    # offline identity growth at the saved VP (layers per virtual stage kept) and into a VP target
    assert e["e_g_vp"] == pytest.approx(e["e_vp"], abs=TOL)
    assert e["e_g_into_vp"] == pytest.approx(e["e_pp1"], abs=TOL)
    assert vp_runs["e_g_into_vp"]["layout"] == "TP1 PP2 VP2 DP1"  # 8 layers: 2 chunks of 2 per rank


@pytest.mark.parametrize("argv,world,message", [
    (["--num-layers-per-virtual-pipeline-stage", "1", "--num-virtual-stages-per-pipeline-rank", "2", *VP_STAGES[:2]],
     2, "give only one of --num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank"),
    (["--num-virtual-stages-per-pipeline-rank", "2"], 1, "needs --pipeline-model-parallel-size > 1"),
    (["--num-layers-per-virtual-pipeline-stage", "3", *VP_STAGES[:2]], 2,
     "2 layers per pipeline stage is not divisible by --num-layers-per-virtual-pipeline-stage 3"),
    (["--num-virtual-stages-per-pipeline-rank", "4", *VP_STAGES[:2]], 2,
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 2 x 4 virtual stages"),
    (["--num-virtual-stages-per-pipeline-rank", "0", *VP_STAGES[:2]], 2, "must be >= 1"),
    ([*VP_STAGES, "--no-overlap-p2p-communication"], 2, "needs --pipeline-model-parallel-size > 2"),
    ([*VP_STAGES, "--global-batch-size", "3"], 2, "to be a multiple of --pipeline-model-parallel-size 2"),
    ([*VP_STAGES, "--num-layers", "0"], 2, "zero-layer model"),
    # Megatron-LM's --microbatch-group-size-per-virtual-pipeline-stage: PP <= group <= micro-batches, and
    # the last group not shorter than PP (4 micro-batches at DP1 here)
    ([*VP_STAGES, "--microbatch-group-size-per-virtual-pipeline-stage", "1"], 2, "must lie between"),
    ([*VP_STAGES, "--microbatch-group-size-per-virtual-pipeline-stage", "5"], 2, "must lie between"),
    ([*VP_STAGES, "--global-batch-size", "5", "--microbatch-group-size-per-virtual-pipeline-stage", "4"], 2,
     "the last group has 1 micro-batches"),
    (["--microbatch-group-size-per-virtual-pipeline-stage", "2"], 2, "is for interleaved 1F1B"),
    (["--num-layers", "0", "--num-layers-per-virtual-pipeline-stage", "1"], 1, "a zero-layer model has no layers"),
])
def test_bad_virtual_pipeline_values_are_one_line(argv, world, message):
    with pytest.raises(UserError) as e:  # later flags win, as in argparse
        validate(parse_config([*BASE, *argv]), world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_growth_stage_must_map_onto_the_virtual_stages_before_training():
    cfg = parse_config([*BASE, *VP_STAGES])
    validate(cfg, 2)
    with pytest.raises(UserError) as e:  # 6 layers do not split into PP2 x 2 virtual stages
        plan_stages(cfg, [{"at_iteration": 2, "num_layers": 6}], 2, TrainState())
    msg = str(e.value)
    assert msg.startswith("staging.stages[0]: ") and "staging.stages[0].target_num_virtual_stages_per_pipeline_rank" in msg
    assert "\n" not in msg
    # the same depth with the interleaving the stage names maps
    plan_stages(cfg, [{"at_iteration": 2, "num_layers": 6, "target_num_virtual_stages_per_pipeline_rank": 3}], 2,
                TrainState())
