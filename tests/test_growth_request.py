"""One definition of a growth request: the ``grow`` flags and the YAML stage keys come from
``GrowthRequest``, and every configured stage is checked before the run builds anything."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_staged.config import Config, resolve_model
from megatron_staged.errors import UserError
from megatron_staged.growth.spec import GrowthRequest
from megatron_staged.staging.stages import plan_stages
from megatron_staged.training.state import TrainState

GROW_FLAGS = {"--num-layers", "--depth-factor", "--depth-map", "--depth-placement", "--depth-init",
              "--width-factor", "--width-split", "--width-noise", "--target-tensor-model-parallel-size",
              "--target-pipeline-model-parallel-size", "--target-num-layers-per-virtual-pipeline-stage",
              "--target-num-virtual-stages-per-pipeline-rank", "--target-decoder-first-pipeline-num-layers",
              "--target-decoder-last-pipeline-num-layers", "--rho", "--rewarmup-iters", "--fresh-moments"}


def _grow_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    GrowthRequest.add_flags(p)
    return p


def test_grow_flags_and_defaults_come_from_the_request():
    p = _grow_parser()
    flags = {s for a in p._actions for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")}
    assert flags - {"--help"} == GROW_FLAGS
    parsed = GrowthRequest.from_args(p.parse_args([]))
    assert parsed == GrowthRequest()  # the flags' defaults are the dataclass's
    assert (parsed.depth_placement, parsed.depth_init, parsed.width_factor, parsed.width_split,
            parsed.rewarmup_iters) == ("interleave", "identity", 1, 0.6, None)  # None: 150, or 0 for an expansion
    got = GrowthRequest.from_args(p.parse_args(["--depth-factor", "2", "--width-factor", "2", "--rho", "1.5",
                                                "--target-tensor-model-parallel-size", "4"]))
    assert (got.depth_factor, got.width_factor, got.rho, got.target_tensor_model_parallel_size) == (2.0, 2, 1.5, 4)
    with pytest.raises(UserError, match=r"--width-factor: 3 is not one of \[1, 2\]"):
        GrowthRequest.from_args(p.parse_args(["--width-factor", "3"]))
    assert parsed.fresh_moments == "zero"
    assert GrowthRequest.from_args(p.parse_args(["--fresh-moments", "bias-corrected"])).fresh_moments == "bias-corrected"


def test_yaml_stage_keys_are_the_request_fields():
    keys = {f.name for f in dataclasses.fields(GrowthRequest)}
    assert keys == {f[2:].replace("-", "_") for f in GROW_FLAGS} | {"at_iteration", "at_fraction", "at_flops",
                                                                    "trigger", "slope_threshold", "eval_iters"}
    r = GrowthRequest.from_stage({"at_iteration": 5, "depth_factor": 2, "width_factor": "2"}, 0)
    assert (r.at_iteration, r.depth_factor, r.width_factor, r.depth_init) == (5, 2.0, 2, "identity")
    with pytest.raises(UserError, match=r"staging.stages\[1\]: unknown key\(s\) \['depth'\]"):
        GrowthRequest.from_stage({"at_iteration": 5, "depth": 2}, 1)
    assert GrowthRequest.from_stage({"depth_factor": 2}, 0).at_fraction == 0.8  # no point named: Bu's tau = 0.8 T
    with pytest.raises(UserError, match=r"staging.stages\[0\].at_fraction 1.5 must be in \(0, 1\)$"):
        GrowthRequest.from_stage({"at_fraction": 1.5, "depth_factor": 2}, 0)
    with pytest.raises(UserError, match=r"needs at most one of .* \(has at_iteration, trigger\)"):
        GrowthRequest.from_stage({"at_iteration": 3, "trigger": "slope", "depth_factor": 2}, 0)
    with pytest.raises(UserError, match=r"staging.stages\[0\].slope_threshold needs trigger: slope"):
        GrowthRequest.from_stage({"at_iteration": 3, "slope_threshold": -0.05, "depth_factor": 2}, 0)
    with pytest.raises(UserError, match=r"staging.stages\[0\].trigger: 'loss' is not one of \['slope'\]"):
        GrowthRequest.from_stage({"trigger": "loss", "depth_factor": 2}, 0)
    with pytest.raises(UserError, match=r"staging.stages\[0\].fresh_moments: 'seeded' is not one of"):
        GrowthRequest.from_stage({"at_iteration": 1, "fresh_moments": "seeded"}, 0)
    with pytest.raises(UserError, match=r"staging.stages\[2\].width_split: cannot interpret 'wide' as float"):
        GrowthRequest.from_stage({"at_iteration": 1, "width_split": "wide"}, 2)


def _cfg(layers=4, tp=1, pp=1, train_iters=100) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = layers, 64, 4, 32
    m.padded_vocab_size = 512
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.training.train_iters, cfg.training.micro_batch_size, cfg.training.global_batch_size = train_iters, 2, 48
    resolve_model(m)
    return cfg


@pytest.mark.parametrize("stages, world, message", [
    ([{"at_iteration": 100, "depth_factor": 2}], 1,
     r"staging.stages\[0\].at_iteration 100 is not before --train-iters 100"),
    ([{"at_iteration": 10, "depth_factor": 2}, {"at_iteration": 10, "width_factor": 2}], 1,
     r"staging.stages\[1\].at_iteration 10 is not after staging.stages\[0\]'s 10; list the stages in the order"),
    ([{"at_iteration": 30, "depth_factor": 2}, {"at_iteration": 10, "width_factor": 2}], 1,
     r"staging.stages\[1\].at_iteration 10 is not after staging.stages\[0\]'s 30"),
    # at_fraction is named as written, with the iteration it resolves to (round(f x 100))
    ([{"at_fraction": 0.996, "depth_factor": 2}], 1,
     r"staging.stages\[0\].at_fraction 0.996 \(iteration 100\) is not before --train-iters 100"),
    ([{"at_fraction": 0.3, "depth_factor": 2}, {"at_iteration": 30, "width_factor": 2}], 1,
     r"staging.stages\[1\].at_iteration 30 is not after staging.stages\[0\]'s at_fraction 0.3 \(iteration 30\)"),
    ([{"at_flops": -1.0, "depth_factor": 2}], 1, r"staging.stages\[0\].at_flops -1.0 must be > 0"),
    ([{"at_iteration": 10, "depth_factor": 2, "depth_placement": "diagonal"}], 1,
     r"staging.stages\[0\].depth_placement: 'diagonal' is not one of"),
    ([{"at_iteration": 10, "depth_factor": 2, "num_layers": 8}], 1,
     r"give at most one of staging.stages\[0\].num_layers, staging.stages\[0\].depth_factor"),
    ([{"at_iteration": 10, "depth_map": "0,1,7"}], 1,
     r"staging.stages\[0\].depth_map refers to layer 7"),
    ([{"at_iteration": 10, "depth_placement": "middle", "num_layers": 12}], 1,
     r"staging.stages\[0\].depth_placement middle can add between 1 and 4 layers"),
    # the second stage is checked against the model the first produces (8 layers, PP 2 -> PP 3)
    ([{"at_iteration": 10, "depth_factor": 2, "target_pipeline_model_parallel_size": 2},
      {"at_iteration": 20, "width_factor": 2, "target_pipeline_model_parallel_size": 3}], 6,
     r"staging.stages\[1\]: the grown model \(8 layers, hidden 128.*--num-layers 8 is not divisible by "
     r"--pipeline-model-parallel-size 3"),
    ([{"at_iteration": 10, "width_factor": 2, "target_tensor_model_parallel_size": 3}], 3,
     r"staging.stages\[0\]: the grown model .* not divisible by --tensor-model-parallel-size 3"),
    ([{"at_iteration": 10, "width_factor": 1}], 1, r"nothing to grow"),
    # found as a new user: `grow --load CKPT --num-layers 4` of a checkpoint that already had 4 layers said
    # "nothing to grow: give --num-layers/..." although --num-layers was given
    ([{"at_iteration": 10, "num_layers": 4}], 1,
     r"nothing to grow: the source model has 4 layers x hidden 64 \(staging.stages\[0\].num_layers 4 keeps it\)"),
    ([{"at_iteration": 10, "depth_factor": 2, "rho": 0}], 1, r"staging.stages\[0\].rho 0.0 must be > 0"),
])
def test_every_stage_is_checked_before_the_run(stages, world, message):
    with pytest.raises(UserError, match=message):
        plan_stages(_cfg(), stages, world, TrainState())


def test_valid_stages_are_planned_in_list_order_and_done_ones_skipped():
    stages = [{"at_iteration": 10, "depth_factor": 2}, {"trigger": "slope", "width_factor": 2},
              {"at_iteration": 50, "depth_factor": 2}]
    planned = plan_stages(_cfg(), stages, 1, TrainState())
    assert [(s.index, s.at_iteration) for s in planned] == [(0, 10), (1, None), (2, 50)]
    # done: by the recorded stage index, or (checkpoints without one) by its iteration
    resumed = TrainState(iteration=20, stage_history=[{"iteration": 10}])
    assert [s.index for s in plan_stages(_cfg(), stages, 1, resumed)] == [1, 2]
    resumed = TrainState(iteration=40, stage_history=[{"iteration": 10, "stage_index": 0},
                                                      {"iteration": 33, "stage_index": 1}])
    assert [s.index for s in plan_stages(_cfg(), stages, 1, resumed)] == [2]
    with pytest.raises(UserError, match=r"staging.stages\[0\].at_iteration 10 lies before the resumed iteration 20"):
        plan_stages(_cfg(), stages, 1, TrainState(iteration=20))
    # an at_fraction point is named as the user wrote it (and the iteration it resolved to)
    frac = [{"at_fraction": 0.1, "depth_factor": 2}]  # of --train-iters 100 (see _cfg): iteration 10
    with pytest.raises(UserError, match=r"staging.stages\[0\].at_fraction 0.1 \(iteration 10\) lies before the "
                                        r"resumed iteration 20"):
        plan_stages(_cfg(), frac, 1, TrainState(iteration=20))


def test_train_state_round_trip_keeps_unknown_keys():
    s = TrainState.from_dict({"iteration": 7, "consumed_train_samples": 56, "flops_so_far": 1.5e9,
                              "stage_history": [{"iteration": 3}], "loss_history": [[7, 2.5, 1.5e9]],
                              "hf_import": {"source": "/m"}, "optimizer_step": 7, "has_optimizer": True})
    d = s.to_dict()
    assert d["hf_import"] == {"source": "/m"}  # carried over by every save (it was dropped before)
    assert "optimizer_step" not in d and "has_optimizer" not in d  # the checkpoint manager's own keys
    assert TrainState.from_dict(d) == s
    s.record_step(2.0, 8, 1e9)
    assert (s.iteration, s.consumed_train_samples, s.flops_so_far, s.loss_history[-1]) == (8, 64, 2.5e9, (8, 2.0, 2.5e9))


def test_builtin_corpus_run_plans_its_stages(monkeypatch, tmp_path):
    """The quickstart's path: --builtin-corpus resolves to a data path, then the stages (validated
    as grown configs) must still be valid."""
    import megatron_staged.data as data
    from megatron_staged.config import validate
    from megatron_staged.data.setup import use_default_corpus

    monkeypatch.setattr(data, "prepare_default_corpus", lambda cache, max_bytes: {
        "data_prefix": str(tmp_path / "corpus_text_document"), "tokenizer_model": str(tmp_path / "tok.model")})
    cfg = _cfg(tp=2, pp=2)
    cfg.data.builtin_corpus = True
    validate(cfg, 4)
    use_default_corpus(cfg)
    assert cfg.data.data_path == [str(tmp_path / "corpus_text_document")]
    planned = plan_stages(cfg, [{"at_iteration": 10, "depth_factor": 2}, {"at_iteration": 20, "width_factor": 2}],
                          4, TrainState())
    assert [s.index for s in planned] == [0, 1]


def test_offline_grow_checks_the_layout_not_the_runs_batch():
    """Found as a new user: `torchrun --nproc-per-node 4 grow --depth-factor 2 --target-pipeline-model-parallel-size 2
    --target-num-layers-per-virtual-pipeline-stage 1` of a run with global batch 4, micro-batch 2 was refused
    (interleaved 1F1B needs a multiple of PP micro-batches: 4 / (2 x DP 2) = 1), with no flag to change the batch.
    As in convert, the batch is the resumed run's business: offline growth checks the layout only, and the
    grown config keeps the run's batch; in-run growth (same function, offline=False) still checks it."""
    from megatron_staged.growth.spec import make_spec, target_config

    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 64, 4
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 4
    resolve_model(cfg.model)
    cfg.model.padded_vocab_size = 256
    spec = make_spec(cfg, GrowthRequest(depth_factor=2, target_pipeline_model_parallel_size=2,
                                        target_num_layers_per_virtual_pipeline_stage=1))
    with pytest.raises(UserError, match="multiple of --pipeline-model-parallel-size"):
        target_config(cfg, spec, 4)
    new = target_config(cfg, spec, 4, offline=True)
    assert new.model.num_layers == 4 and new.parallel.pipeline_model_parallel_size == 2
    assert new.parallel.num_layers_per_virtual_pipeline_stage == 1 and new.training.global_batch_size == 4
    with pytest.raises(UserError, match="not divisible by --pipeline-model-parallel-size 3"):  # layout still checked
        target_config(cfg, make_spec(cfg, GrowthRequest(depth_factor=2, target_pipeline_model_parallel_size=3)),
                      3, offline=True)


def test_a_stage_list_edited_after_a_growth_is_refused_not_skipped(tmp_path):
    """The checkpoint names its growths by stage index: a list edited after one ran (here the width stage
    removed) must not let the depth stage, now at index 0, pass as done and never run."""
    from conftest import TINY_MOCK, run_cli

    ran, edited = tmp_path / "ran.yaml", tmp_path / "edited.yaml"
    ran.write_text("staging:\n  stages:\n    - {at_iteration: 1, width_factor: 2}\n"
                   "    - {at_iteration: 3, depth_factor: 2}\n")
    edited.write_text("staging:\n  stages:\n    - {at_iteration: 3, depth_factor: 2}\n")
    ck = tmp_path / "ck"
    run_cli(["train", *TINY_MOCK, "--train-iters", "4", "--exit-interval", "2", "--config", str(ran), "--save", str(ck)])
    bad = run_cli(["train", *TINY_MOCK, "--train-iters", "4", "--config", str(edited), "--load", str(ck),
                   "--save", str(ck)], check=False)
    assert bad.returncode != 0
    assert "staging.stages[0] is not the stage 0 this run applied at iteration 1 (width" in bad.stderr, bad.stderr[-2000:]
    good = run_cli(["train", *TINY_MOCK, "--train-iters", "4", "--config", str(ran), "--load", str(ck), "--save", str(ck)])
    assert "growth at iteration 3: depth" in good.stdout + good.stderr


def test_growths_that_push_the_lr_decay_past_the_run_are_warned_about():
    """Each growth sets the schedule back to round(S_pre / rho); worked out by hand for rho 1.4:
    growth at 5: 5 -> 4 (1 behind); at 10: 9 -> round(6.43) = 6 (4 behind); at --train-iters 20 the
    schedule is at step 16, where a WSD decay over the last 4 of 20 steps only begins."""
    from megatron_staged.staging.stages import plan_stages, schedule_end_warnings
    from megatron_staged.training.state import TrainState

    cfg = _cfg(train_iters=20)
    cfg.optim.lr_decay_style, cfg.optim.lr_wsd_decay_iters = "WSD", 4
    stages = plan_stages(cfg, [{"at_iteration": 5, "depth_factor": 2}, {"at_iteration": 10, "depth_factor": 2}], 1,
                         TrainState())
    (line,) = schedule_end_warnings(cfg, stages)
    assert "back by 4 steps" in line and "schedule step 16 of 20" in line and "never starts" in line
    assert "--lr-decay-iters 16" in line
    cfg.optim.lr_decay_iters = 16  # the suggested fix: the decay now ends with the run
    assert schedule_end_warnings(cfg, stages) == []
    cfg.optim.lr_decay_iters, cfg.optim.lr_decay_style = None, "cosine"  # cosine: 4 steps short of --min-lr
    (line,) = schedule_end_warnings(cfg, stages)
    assert "ends 4 steps before the cosine decay reaches --min-lr" in line
    expansion = plan_stages(cfg, [{"at_iteration": 5, "num_layers": 8, "depth_init": "zero"}], 1, TrainState())
    assert schedule_end_warnings(cfg, expansion) == []  # rho 1: the schedule is not moved


def test_resume_refuses_only_a_stage_the_saving_run_would_have_grown():
    """A stage is checked at each loop start k (state after k iterations) from the growth before it on;
    a checkpoint of iteration N was saved before the check at N. FLOPs here: 100 per iteration."""
    hist = [(k, 3.0, 100.0 * k) for k in range(1, 13)]
    flops = [{"at_flops": 150.0, "depth_factor": 2}]  # reached after iteration 2: grows at loop start 2
    at2 = TrainState(iteration=2, flops_so_far=200.0, loss_history=hist[:2])  # e.g. --exit-interval 2
    assert [s.index for s in plan_stages(_cfg(), flops, 1, at2)] == [0]
    at3 = TrainState(iteration=3, flops_so_far=300.0, loss_history=hist[:3])
    with pytest.raises(UserError, match=r"staging.stages\[0\].at_flops 150 lies before the resumed iteration 3"):
        plan_stages(_cfg(), flops, 1, at3)
    # a stage listed after another waits for it: its point passing first is no error
    waits = [{"at_flops": 1e30, "depth_factor": 2}, {"at_iteration": 5, "width_factor": 2}]
    assert [s.index for s in plan_stages(_cfg(), waits, 1, TrainState(iteration=8, loss_history=hist[:8]))] == [0, 1]
    # ...and it grows at the iteration of the stage before it (10): saved there after that growth
    grew = [{"iteration": 10, "stage_index": 0, "spec": {"at_flops": 1e30}}]
    assert [s.index for s in plan_stages(_cfg(), waits, 1, TrainState(iteration=10, stage_history=grew,
                                                                         loss_history=hist[:10]))] == [1]
    with pytest.raises(UserError, match=r"staging.stages\[1\].at_iteration 5 lies before the resumed iteration 11"):
        plan_stages(_cfg(), waits, 1, TrainState(iteration=11, stage_history=grew, loss_history=hist[:11]))
