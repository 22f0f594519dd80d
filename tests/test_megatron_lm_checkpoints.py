"""Checkpoints both ways with Megatron-LM (issue 13, item 3).

The fixture ``tests/fixtures/megatron_lm/ckpt`` was written by Megatron-LM's own ``save_checkpoint``
(tag core_v0.16.1, TP1 PP1 DP2, distributed optimizer in its default ``dp_reshardable`` form, 2
iterations): see ``tests/fixtures/megatron_lm/make_fixture.py``. The oracles read the fixture's raw
files with torch (its Namespace, its samples-counted scheduler, its flat optimizer buckets), not
through this project's readers.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli, torchrun

FIXTURE = ROOT / "tests" / "fixtures" / "megatron_lm" / "ckpt"
ITER_DIR = FIXTURE / "iter_0000002"
# flags of a run resuming the fixture (data and schedule flags as Megatron-LM's run had them)
RESUME = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
          "--lr-warmup-iters", "1", "--lr-decay-iters", "10", "--use-distributed-optimizer", "--log-interval", "1",
          "--eval-iters", "1", "--progress-bar", "off"]


def raw_common(ckpt_dir) -> dict:
    """common.pt as Megatron-LM itself reads it (torch.load with the classes it pickles allowed)."""
    import signal

    import numpy as np
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    allowed = [argparse.Namespace, signal.Signals, ModelType, AttnBackend, np.ndarray, np.dtype,
               np.dtypes.UInt32DType, (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(os.path.join(ckpt_dir, "common.pt"), weights_only=True)


def dcp_keys(ckpt_dir) -> dict:
    from megatron_staged.checkpoint.global_tensors import read_metadata

    return {k: tuple(getattr(v, "size", ()) or ()) for k, v in read_metadata(str(ckpt_dir)).state_dict_metadata.items()}


def test_megatron_lm_common_pt_reads_as_data_and_translates():
    """Its Namespace, enums and numpy RNG load weights-only; the config, train state and the LR
    schedule (samples -> iterations) come out with Megatron-LM's meaning; code in a pickle is refused."""
    from megatron_staged.checkpoint.global_tensors import read_common
    from megatron_staged.checkpoint.safe_load import UnsafeCheckpoint, load_torch_file

    raw = raw_common(ITER_DIR)
    ns, gbs = raw["args"], raw["args"].global_batch_size
    c = read_common(str(ITER_DIR))
    assert c["saved_by"] == "Megatron-LM" and c["megatron_lm_args"].num_layers == ns.num_layers
    m = c["args"]["model"]
    assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["padded_vocab_size"]) == \
        (ns.num_layers, ns.hidden_size, ns.num_attention_heads, ns.padded_vocab_size) == (2, 32, 4, 128)
    assert m["model_family"] == "gpt2" and m["disable_bias_linear"] is (not ns.add_bias_linear)
    assert c["args"]["parallel"]["use_distributed_optimizer"] is True
    assert c["train_state"]["iteration"] == raw["iteration"] == 2
    assert c["train_state"]["consumed_train_samples"] == ns.consumed_train_samples == 2 * gbs
    assert c["train_state"]["flops_so_far"] == raw["num_floating_point_operations_so_far"] > 0
    assert c["parallel_layout"] == {"tp": 1, "pp": 1, "dp": 2}
    s_raw, s = raw["opt_param_scheduler"], c["opt_param_scheduler"]
    for k in ("num_steps", "lr_warmup_steps", "lr_decay_steps"):
        assert s[k] * gbs == s_raw[k]
    assert (s["num_steps"], s["lr_warmup_steps"], s["lr_decay_steps"]) == (2, 1, 10)
    # the same Namespace carrying a call to os.system is still refused
    evil = argparse.Namespace(num_layers=2)
    evil.payload = _Evil()
    buf = io.BytesIO()
    torch.save({"args": evil}, buf)
    bad = Path(os.environ.get("TMPDIR", "/tmp")) / f"evil_common_{os.getpid()}.pt"
    bad.write_bytes(buf.getvalue())
    try:
        with pytest.raises(UnsafeCheckpoint, match="posix.system|os.system"):
            load_torch_file(str(bad))
    finally:
        bad.unlink()


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def _runs_in_bucket(bucket: torch.Tensor, parts: dict) -> dict:
    """Where each flattened tensor of ``parts`` lies as one contiguous run in ``bucket`` (else None)."""
    out = {}
    for name, v in parts.items():
        v = v.flatten()
        found = None
        for c in (bucket == v[0]).nonzero().flatten().tolist():
            if c + v.numel() <= bucket.numel() and torch.equal(bucket[c:c + v.numel()], v):
                found = (c, c + v.numel())
                break
        out[name] = found
    return out


def test_megatron_lm_checkpoint_converts_grows_exports_and_resumes(tmp_path):
    """convert, grow, export-hf and train read Megatron-LM's checkpoint, its dp_reshardable optimizer
    included: the converted moments are exactly Megatron-LM's flat buckets cut at each parameter."""
    from megatron_staged.checkpoint.global_tensors import read_common, read_global_tensors, tensor_specs

    # convert (at the saved TP1 PP1; DP2 -> DP1) rewrites it in model space
    conv = tmp_path / "conv"
    run_cli(["convert", "--load", str(FIXTURE), "--save", str(conv)], timeout=900)
    cdir = conv / "iter_0000002"
    model_keys = [k for k in tensor_specs(str(ITER_DIR)) if not k.startswith("optimizer.")]
    ours = read_global_tensors(str(cdir))
    theirs = read_global_tensors(str(ITER_DIR))
    for k in model_keys:
        assert torch.equal(ours[k], theirs[k]), k
    # the RNG state: per (TP, PP) rank, so a DP change carries it (Megatron-LM reads entry 0 of its list)
    import oracle

    oracle.assert_same_rng(oracle.saved_rng(cdir)[0], oracle.saved_rng(ITER_DIR)[0])
    prefix = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32, torch.float32).bucket_idx_0."
    for moment in ("param", "exp_avg", "exp_avg_sq"):
        bucket = theirs[prefix + moment]
        parts = {}
        for k in model_keys:
            t = ours[f"optimizer.state.{moment}.{k}"]
            if k.startswith("decoder.layers."):
                parts.update({f"{k}[{i}]": t[i] for i in range(t.shape[0])})
            else:
                parts[k] = t
        runs = _runs_in_bucket(bucket, parts)
        assert all(runs.values()), [n for n, r in runs.items() if r is None]
        spans = sorted(runs.values())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "overlapping runs"
        assert sum(b - a for a, b in spans) == sum(p.numel() for p in parts.values())
    # the moments are non-trivial (two Adam steps were taken)
    assert float(ours["optimizer.state.exp_avg_sq.decoder.layers.mlp.linear_fc1.weight"].abs().sum()) > 0
    c = read_common(str(cdir))
    assert c["train_state"]["iteration"] == 2 and c["train_state"]["consumed_train_samples"] == 8
    assert c["opt_param_scheduler"]["num_steps"] == 2

    # grow: depth x2 (the dp_reshardable optimizer is converted at its saved layout first)
    grown = tmp_path / "grown"
    run_cli(["grow", "--load", str(FIXTURE), "--save", str(grown), "--depth-factor", "2"], timeout=900)
    g = read_common(str(grown / "iter_0000002"))
    assert g["args"]["model"]["num_layers"] == 4
    gt = read_global_tensors(str(grown / "iter_0000002"), ["decoder.layers.mlp.linear_fc1.weight"])
    assert gt["decoder.layers.mlp.linear_fc1.weight"].shape[0] == 4
    assert not (tmp_path / "grown.megatron_lm_import").exists()

    # export-hf: the weights as transformers' GPT-2 holds them
    hf = tmp_path / "hf"
    run_cli(["export-hf", "--load", str(FIXTURE), "--out", str(hf)], timeout=900)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg.get("n_layer", cfg.get("num_hidden_layers")) == 2

    # train resumes at iteration 3 on Megatron-LM's LR schedule (cosine, warmup 1, decay 10, samples)
    out = tmp_path / "resumed"
    log = tmp_path / "log.jsonl"
    run_cli(["train", "--load", str(FIXTURE), "--save", str(out), *RESUME, "--train-iters", "3",
             "--save-interval", "3", "--log-file", str(log)], timeout=900)
    recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    it3 = [r for r in recs if r.get("iteration") == 3 and "loss" in r][0]
    lr = 1e-4 + 0.5 * (1 + math.cos(math.pi * (3 - 1) / (10 - 1))) * (1e-3 - 1e-4)
    assert it3["lr"] == pytest.approx(lr, rel=1e-6)
    assert math.isfinite(it3["loss"]) and it3["loss"] < math.log(128) + 0.5
    _check_ours_matches_megatron_lm(out / "iter_0000003")


def _check_ours_matches_megatron_lm(ours_dir):
    """A checkpoint saved here holds what Megatron-LM's load_checkpoint reads, in its form."""
    mine, ref = raw_common(ours_dir), raw_common(ITER_DIR)
    assert set(ref) <= set(mine), set(ref) - set(mine)
    assert isinstance(mine["args"], argparse.Namespace)
    # every attribute Megatron-LM's load_checkpoint / check_checkpoint_args / _load_base_checkpoint reads
    read_by_megatron_lm = ["num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                           "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size",
                           "tokenizer_type", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                           "world_size", "data_parallel_size", "consumed_train_samples", "skipped_train_samples",
                           "consumed_valid_samples", "no_save_optim", "no_save_rng", "ckpt_format",
                           "use_distributed_optimizer", "global_batch_size", "seq_length", "ffn_hidden_size",
                           "num_query_groups", "kv_channels", "normalization", "swiglu", "add_bias_linear",
                           "untie_embeddings_and_output_weights", "position_embedding_type"]
    for name in read_by_megatron_lm:
        assert hasattr(mine["args"], name), name
        assert type(getattr(mine["args"], name)) is type(getattr(ref["args"], name)) or \
            getattr(ref["args"], name) is None, (name, getattr(mine["args"], name), getattr(ref["args"], name))
    for name in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size", "add_bias_linear",
                 "add_position_embedding", "ffn_hidden_size", "normalization", "global_batch_size"):
        assert getattr(mine["args"], name) == getattr(ref["args"], name), name
    assert mine["args"].consumed_train_samples == 12 and mine["iteration"] == 3
    assert mine["checkpoint_version"] == ref["checkpoint_version"] == 3.0
    # scheduler in samples, as Megatron-LM counts it
    gbs = mine["args"].global_batch_size
    assert set(ref["opt_param_scheduler"]) <= set(mine["opt_param_scheduler"])
    assert mine["opt_param_scheduler"]["num_steps"] == 3 * gbs
    assert mine["opt_param_scheduler"]["lr_decay_steps"] == ref["opt_param_scheduler"]["lr_decay_steps"]
    # content metadata names the optimizer form; the keys Megatron-LM writes are all there
    assert set(ref["content_metadata"]) <= set(mine["content_metadata"])
    assert mine["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    # sharded keys: the model's are Megatron-LM's exactly; the RNG object has its (PP, TP) shape
    ours_keys, ref_keys = dcp_keys(ours_dir), dcp_keys(ITER_DIR)
    model = {k: v for k, v in ref_keys.items() if not k.startswith(("optimizer.", "rng_state"))}
    assert {k: ours_keys.get(k) for k in model} == model
    rng = [k for k in ours_keys if k.startswith("rng_state/")]
    assert rng and all(k.split("_")[-1].count(".") == [r for r in ref_keys if r.startswith("rng_state/")][0]
                       .split("_")[-1].count(".") for k in rng)


def test_megatron_lm_checkpoint_converts_to_another_dtype_and_layout_in_one_step(tmp_path):
    """Found as a new user: `convert --dtype bf16` of a Megatron-LM checkpoint failed with
    "CheckpointException ... (does the model config match?)" (its dp_reshardable optimizer keys name the
    buckets' dtypes), and `convert --target-tensor-model-parallel-size 2` stopped asking for a convert
    at the saved layout first. convert now does that step itself, as grow does."""
    from megatron_staged.checkpoint.global_tensors import read_global_tensors, tensor_specs

    theirs = read_global_tensors(str(ITER_DIR))
    model_keys = [k for k in tensor_specs(str(ITER_DIR)) if not k.startswith("optimizer.")]
    bf = tmp_path / "bf16"
    run_cli(["convert", "--load", str(FIXTURE), "--save", str(bf), "--dtype", "bf16"], timeout=900)
    ours = read_global_tensors(str(bf / "iter_0000002"))
    for k in model_keys:
        assert ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k].to(torch.bfloat16)), k
        assert torch.equal(ours[f"optimizer.state.param.{k}"], theirs[k]), k  # fp32 masters carried over
    assert not (tmp_path / "bf16.megatron_lm_import").exists()
    tp2 = tmp_path / "tp2"
    torchrun(["convert", "--load", str(FIXTURE), "--save", str(tp2), "--target-tensor-model-parallel-size", "2"],
             nproc=2, timeout=900)
    ours = read_global_tensors(str(tp2 / "iter_0000002"))
    for k in model_keys:
        assert torch.equal(ours[k], theirs[k]), k


def test_megatron_lm_import_scratch_dir_of_the_user_is_not_deleted(tmp_path):
    """Found by reading grow/convert: the scratch copy `<save>.megatron_lm_import` was written with
    overwrite and then rmtree'd, so a user's directory of that name was deleted. A non-empty one is refused."""
    scratch = tmp_path / "out.megatron_lm_import"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("mine")
    for argv in (["grow", "--load", str(FIXTURE), "--save", str(tmp_path / "out"), "--depth-factor", "2"],
                 ["convert", "--load", str(FIXTURE), "--save", str(tmp_path / "out"), "--dtype", "bf16"]):
        r = run_cli(argv, timeout=600, check=False)
        assert r.returncode == 2 and "out.megatron_lm_import exists and is not empty" in r.stderr, r.stderr[-2000:]
        assert (scratch / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()
