"""Growth cases found by running the tools as a new user would, on inputs no other test names.

Each test is one small process or two (mock data, tiny models) and checks against a reference that
does not come from the growth code: a run without the growth, or tensors read directly with torch.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from conftest import TINY_MOCK, run_cli

SCALE = re.compile(r"iteration\s+(\d+)/.*?loss scale: ([0-9.]+)")


def _scales(stdout: str) -> dict[int, float]:
    return {int(i): float(s) for i, s in SCALE.findall(stdout)}


def _grad_scaler(ckpt: str) -> dict:
    common = sorted(glob.glob(os.path.join(ckpt, "iter_*", "common.pt")))[-1]
    return torch.load(common, map_location="cpu", weights_only=False)["optimizer"]["grad_scaler"]


def test_fp16_loss_scale_survives_growth(tmp_path):
    """fp16's dynamic loss scale is training state: growth preserves the loss, so the overflow
    history, hence the scale, must continue as in a run that did not grow (it used to restart at
    --initial-loss-scale after every growth, in-run and offline, and skip steps until it backed off)."""
    flags = [*TINY_MOCK, "--fp16", "--hysteresis", "1", "--use-distributed-optimizer"]
    plain = run_cli(["train", *flags, "--train-iters", "3", "--save", str(tmp_path / "plain")])
    ref = _scales(plain.stdout)
    assert ref[1] > ref[3]  # the tiny model overflows at 2^32: the scale backs off every step

    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2}\n")
    staged = run_cli(["train", *flags, "--train-iters", "3", "--config", str(cfg)])
    assert "growth at iteration 2" in staged.stdout
    assert _scales(staged.stdout) == ref

    # offline: the grown checkpoint holds the source's scaler state, read back with torch
    run_cli(["grow", "--load", str(tmp_path / "plain"), "--save", str(tmp_path / "grown"), "--depth-factor", "2"])
    src, got = _grad_scaler(str(tmp_path / "plain")), _grad_scaler(str(tmp_path / "grown"))
    assert float(src["scale"]) == ref[3] < 2.0 ** 32
    assert float(got["scale"]) == float(src["scale"])
    assert (got["growth_tracker"], got["hysteresis_tracker"]) == (src["growth_tracker"], src["hysteresis_tracker"])


def test_log_params_norm_equals_the_checkpoints_norm(tmp_path):
    """--log-params-norm (a Megatron-LM flag) raised on every iteration under the strict device checks
    (a host accumulator added to device parameters and all-reduced: a crash on GPU); its value must
    be the L2 norm of the saved weights, read with torch (tied embeddings stored once)."""
    import oracle as O

    r = run_cli(["train", *TINY_MOCK, "--train-iters", "2", "--log-params-norm", "--save", str(tmp_path / "ck")])
    logged = [float(x) for x in re.findall(r"params norm: ([0-9.]+)", r.stdout)]
    assert len(logged) == 2
    weights = {k: v for k, v in O.read_tensors(str(tmp_path / "ck")).items() if O.split_key(k) == ("param", k)}
    assert "embedding.word_embeddings.weight" in weights and "output_layer.weight" not in weights
    expected = float(sum(v.double().pow(2).sum() for v in weights.values()).sqrt())
    assert abs(logged[-1] - expected) <= 1e-3 * expected


def test_a_layout_that_does_not_fit_names_the_target_layout_keys():
    """Found as a new user: one process growing a TP2 checkpoint offline was told only to launch 2 processes;
    the target layout defaults to the source's, and the flag that changes it is the other way out."""
    import pytest

    from megatron_staged.config import Config, resolve_model
    from megatron_staged.errors import UserError
    from megatron_staged.growth.spec import GrowthRequest, make_spec, target_config

    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 64, 4
    cfg.parallel.tensor_model_parallel_size = 2
    resolve_model(cfg.model)
    cfg.model.padded_vocab_size = 256
    with pytest.raises(UserError, match=r"launch a multiple of 2 processes.*--target-tensor-model-parallel-size"):
        target_config(cfg, make_spec(cfg, GrowthRequest(depth_factor=2)), 1, offline=True)
    with pytest.raises(UserError, match=r"staging\.stages\[0\]\.target_tensor_model_parallel_size"):
        target_config(cfg, make_spec(cfg, GrowthRequest(depth_factor=2), 0), 1)
    new = target_config(cfg, make_spec(cfg, GrowthRequest(depth_factor=2, target_tensor_model_parallel_size=1)), 1,
                        offline=True)
    assert new.parallel.tensor_model_parallel_size == 1 and new.model.num_layers == 4


def test_a_padded_vocabulary_that_does_not_split_says_how_to_get_one_that_does():
    """Found as a new user: a model with 6 heads trained at TP1 (vocabulary padded to 256) cannot be
    evaluated, resumed or grown at TP3; the error now says the padding is fixed and how to start a run
    that can reach TP3 (and --make-vocab-size-divisible-by 384 does pad to a multiple of 3)."""
    import pytest

    from megatron_staged.config import Config
    from megatron_staged.errors import UserError
    from megatron_staged.model.builder import set_padded_vocab_size

    cfg = Config()
    cfg.parallel.tensor_model_parallel_size = 3
    cfg.model.padded_vocab_size = 256
    with pytest.raises(UserError, match=r"not divisible by --tensor-model-parallel-size 3; .*"
                                        r"--make-vocab-size-divisible-by a multiple of 3"):
        set_padded_vocab_size(cfg, 200)
    cfg = Config()
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.model.make_vocab_size_divisible_by = 384
    assert set_padded_vocab_size(cfg, 200) % 3 == 0


def test_a_growth_at_the_last_iteration_says_what_to_do_instead():
    """Found as a new user: a stage at_iteration == --train-iters (to end the job with the grown model)
    is refused; the error now names the offline tool that grows the final checkpoint."""
    import pytest

    from megatron_staged.config import Config, resolve_model
    from megatron_staged.errors import UserError
    from megatron_staged.staging.stages import plan_stages
    from megatron_staged.training.state import TrainState

    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 64, 4
    cfg.model.padded_vocab_size = 256
    cfg.training.train_iters = 5
    resolve_model(cfg.model)
    with pytest.raises(UserError, match=r"at_iteration 5 is not before --train-iters 5: .*`megatron-staged grow`"):
        plan_stages(cfg, [{"at_iteration": 5, "depth_factor": 2}], 1, TrainState())
    assert [s.at_iteration for s in plan_stages(cfg, [{"at_iteration": 4, "depth_factor": 2}], 1, TrainState())] == [4]


def test_resuming_a_grown_run_names_the_flags_the_checkpoint_replaces(tmp_path):
    """The job script of a staged run keeps the first stage's --num-layers / --hidden-size; on a requeue
    after the growth the checkpoint's (grown) shape is used, and the run says so instead of silently
    overriding flags the user gave (shapes by hand: depth x2 of 2 layers = 4, width x2 of 32 = 64)."""
    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, width_factor: 2}\n")
    ckpt = tmp_path / "ckpt"
    args = ["train", *TINY_MOCK, "--config", str(cfg), "--save", str(ckpt), "--load", str(ckpt)]
    first = run_cli([*args, "--train-iters", "3"])
    assert "growth at iteration 2" in first.stdout and "holds the grown model" not in first.stdout
    again = run_cli([*args, "--train-iters", "4"])
    notes = [l for l in again.stdout.splitlines() if "holds the grown model" in l]
    assert len(notes) == 1, again.stdout[-3000:]
    assert "(growth at iteration 2)" in notes[0]
    assert "--hidden-size 64 (given: 32)" in notes[0] and "--num-layers 4 (given: 2)" in notes[0]
    assert re.search(r"iteration\s+4/", again.stdout)
