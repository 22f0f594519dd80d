"""Switching optimizer kind (``--use-distributed-optimizer`` or not) and, without the distributed
optimizer, precision between jobs: the Adam moments, the fp32 master weights and the step carry over.

The oracles read the checkpoints' tensors with torch DCP directly (whole global tensors, whatever
layout saved them), not through this project's readers, and compare them per parameter; the loss
test compares a run that switches at resume with the same run uninterrupted.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import ROOT, TINY_MOCK, losses, run_cli, torchrun

# a schedule whose LR is not yet decayed over these few iterations (so every update counts)
RUN = [*TINY_MOCK, "--lr-decay-iters", "100"]


def dcp_tensors(iter_dir) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(iter_dir)).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=FileSystemReader(str(iter_dir)), no_dist=True)
    return sd


def optimizer_view(iter_dir) -> dict:
    """(kind, parameter) -> fp32 tensor: each parameter's exp_avg, exp_avg_sq and fp32 master, by
    megatron-core's key names: the distributed optimizer's master is ``param``, the non-distributed
    16-bit optimizer's ``fp32_param``; a non-distributed fp32 run's master is its weight."""
    sd = dcp_tensors(iter_dir)
    out = {}
    for key in (k for k in sd if not k.startswith("optimizer.")):
        for kind in ("exp_avg", "exp_avg_sq"):
            out[(kind, key)] = sd[f"optimizer.state.{kind}.{key}"]
        masters = [k for k in (f"optimizer.state.param.{key}", f"optimizer.state.fp32_param.{key}") if k in sd]
        assert len(masters) <= 1, masters
        master = sd[masters[0]] if masters else sd[key]
        assert master.dtype == torch.float32, (key, master.dtype)
        out[("master", key)] = master
    return out


def saved_steps(iter_dir) -> set:
    """The Adam step megatron-core wrote from the live optimizer into common.pt (the non-distributed
    optimizer's ``common_step``, the distributed one's param-group ``step``)."""
    c = torch.load(iter_dir / "common.pt", weights_only=False)
    opt = c["optimizer"]
    if "param_state_sharding_type" in opt:
        return {float(g["step"]) for g in opt["optimizer"]["param_groups"]}
    inner = opt.get("optimizer", opt)  # bf16/fp16: Float16OptimizerWithFloat16Params wraps torch's
    return {float(inner["state"]["common_step"])}


def saved_form(iter_dir) -> tuple:
    c = torch.load(iter_dir / "common.pt", weights_only=False)
    cfg, lay = c["megatron_staged_config"], c["parallel_layout"]
    return (cfg["parallel"]["use_distributed_optimizer"], bool(cfg["model"]["bf16"]), lay["tp"], lay["pp"], lay["dp"])


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    """3 iterations of a bf16 run without the distributed optimizer (fp32 masters as ``fp32_param``)."""
    src = tmp_path_factory.mktemp("optswitch") / "src"
    run_cli(["train", *RUN, "--bf16", "--train-iters", "3", "--save", str(src)])
    return src


def test_optimizer_state_carries_across_kind_precision_and_layout(tmp_path, bf16_source):
    """plain bf16 (TP1 DP1) -> distributed bf16 (TP2 DP2) -> plain fp32 (PP2) -> plain bf16 (TP1): no
    training in between, so every moment and master must come out exactly as trained, and the step."""
    src, it = bf16_source, "iter_0000003"
    before = optimizer_view(src / it)
    assert saved_steps(src / it) == {3.0}
    hops = [
        (4, ["--use-distributed-optimizer", "--target-tensor-model-parallel-size", "2"], (True, True, 2, 1, 2)),
        (2, ["--no-use-distributed-optimizer", "--dtype", "fp32", "--target-tensor-model-parallel-size", "1",
             "--target-pipeline-model-parallel-size", "2"],
         (False, False, 1, 2, 1)),
        (1, ["--dtype", "bf16", "--target-pipeline-model-parallel-size", "1"], (False, True, 1, 1, 1)),
    ]
    prev = src
    for n, (nproc, flags, form) in enumerate(hops):
        out = tmp_path / f"hop{n}"
        args = ["convert", "--load", str(prev), "--save", str(out), *flags]
        torchrun(args, nproc) if nproc > 1 else run_cli(args)
        assert saved_form(out / it) == form
        assert_same_optimizer_state(before, optimizer_view(out / it))
        assert saved_steps(out / it) == {3.0}, (form, saved_steps(out / it))
        prev = out
    # the fp32 run's weights are the bf16 run's fp32 masters, not its rounded bf16 weights
    fp32 = dcp_tensors(tmp_path / "hop1" / it)
    src_sd = dcp_tensors(src / it)
    key = "decoder.layers.mlp.linear_fc1.weight"
    assert torch.equal(fp32[key], src_sd[f"optimizer.state.fp32_param.{key}"])
    assert not torch.equal(fp32[key], src_sd[key].float())


def test_resume_that_switches_optimizer_kind_continues_the_same_losses(tmp_path):
    """fp32: plain -> distributed at iteration 2 -> plain at 4 gives the uninterrupted plain run's
    losses (an update after each resume depends on the moments, the master and the step)."""
    ref_log, a = tmp_path / "ref.jsonl", tmp_path / "a"
    run_cli(["train", *RUN, "--train-iters", "6", "--save", str(a), "--save-interval", "2", "--log-file", str(ref_log)])
    ref = losses(ref_log)
    b, b_log = tmp_path / "b", tmp_path / "b.jsonl"
    run_cli(["train", *RUN, "--train-iters", "6", "--load", str(a / "iter_0000002"), "--use-distributed-optimizer",
             "--save", str(b), "--save-interval", "4", "--log-file", str(b_log)])
    c_log = tmp_path / "c.jsonl"
    run_cli(["train", *RUN, "--train-iters", "6", "--load", str(b / "iter_0000004"), "--log-file", str(c_log)])
    got = dict(losses(b_log))
    assert sorted(got) == [3, 4, 5, 6]
    got.update(losses(c_log))
    for i in (3, 4, 5, 6):
        assert got[i] == pytest.approx(ref[i], rel=1e-6, abs=0), (i, got[i], ref[i])
    assert saved_steps(b / "iter_0000004") == {4.0}


def test_megatron_lm_flat_optimizer_is_still_refused_without_the_distributed_optimizer(tmp_path):
    """Megatron-LM's default dp_reshardable form holds flat buckets, not per-parameter tensors: a run
    without the distributed optimizer is refused in one line (convert rewrites it first)."""
    fixture = ROOT / "tests" / "fixtures" / "megatron_lm" / "ckpt"
    from test_megatron_lm_checkpoints import RESUME

    flags = [f for f in RESUME if f != "--use-distributed-optimizer"]
    r = run_cli(["train", *flags, "--train-iters", "3", "--load", str(fixture)], check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    err = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("warning")]
    assert len(err) == 1 and "'dp_reshardable' form" in err[0] and "convert" in err[0], r.stderr[-3000:]


def test_grow_writes_the_other_optimizer_form(tmp_path, bf16_source):
    """grow --use-distributed-optimizer from a non-distributed bf16 checkpoint: the grown moments,
    masters and step are those of the same growth written in the source's own form."""
    it = "iter_0000003"
    same, other = tmp_path / "same", tmp_path / "other"
    run_cli(["grow", "--load", str(bf16_source), "--save", str(same), "--depth-factor", "2"])
    run_cli(["grow", "--load", str(bf16_source), "--save", str(other), "--depth-factor", "2",
             "--use-distributed-optimizer"])
    assert saved_form(same / it)[:2] == (False, True) and saved_form(other / it)[:2] == (True, True)
    want = optimizer_view(same / it)
    assert ("exp_avg", "decoder.layers.mlp.linear_fc1.weight") in want
    assert_same_optimizer_state(want, optimizer_view(other / it))
    assert saved_steps(same / it) == saved_steps(other / it) == {3.0}


def test_fp16_dynamic_loss_scale_carries_across_optimizer_kinds(tmp_path):
    """fp16 without, then with, then again without the distributed optimizer: each resume continues the
    dynamic loss scaler saved in common.pt (read with torch.load): scale and growth tracker follow
    megatron-core's rule (no overflow: the tracker counts to --loss-scale-window, then the scale doubles)
    from the saved values, not from --initial-loss-scale."""
    import re

    window = 2
    args = [*RUN, "--fp16", "--initial-loss-scale", "1024", "--loss-scale-window", str(window), "--hysteresis", "1"]

    def scales(stdout):
        return {int(i): float(s) for i, s in re.findall(r"iteration +(\d+)/ *\d+ .*?loss scale: ([0-9.]+)", stdout)}

    def scaler(iter_dir):
        g = torch.load(iter_dir / "common.pt", weights_only=False)["optimizer"]["grad_scaler"]
        return float(g["scale"]), int(g["growth_tracker"])

    run_cli(["train", *args, "--train-iters", "3", "--save", str(tmp_path / "a")])
    prev, it = tmp_path / "a" / "iter_0000003", 3
    for name, dist_opt in (("b", ["--use-distributed-optimizer"]), ("c", [])):
        scale, tracker = scaler(prev)
        assert (scale, tracker) != (1024.0, 0)  # the saved state is not the initial one
        r = run_cli(["train", *args, *dist_opt, "--train-iters", str(it + 2), "--load", str(prev),
                     "--save", str(tmp_path / name)])
        skipped = re.findall(r"number of skipped iterations: +(\d+)", r.stdout)
        assert skipped and set(skipped) == {"0"}, r.stdout[-2000:]  # no overflow: the rule below holds
        expect = {}
        for i in (it + 1, it + 2):
            tracker += 1
            if tracker == window:
                scale, tracker = scale * 2, 0
            expect[i] = scale
        assert scales(r.stdout) == expect, r.stdout[-2000:]
        prev, it = tmp_path / name / f"iter_{it + 2:07d}", it + 2
        assert saved_form(prev)[0] == bool(dist_opt) and scaler(prev) == (scale, tracker)
