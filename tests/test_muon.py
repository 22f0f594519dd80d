"""Muon (--optimizer muon / dist_muon, docs/muon.md): the update, the refusals, and its state through
save/load, convert and growth.

Oracles are written here, independently of the code they check: a Newton-Schulz iteration and an
SVD for the update; for the state, the checkpoints' global tensors read back and compared with what
docs/muon.md defines (convert: unchanged; growth: Muon's momentum grown as Adam's m).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import ROOT, TINY_GPT2, losses, torchrun

needs_package = pytest.mark.skipif(importlib.util.find_spec("emerging_optimizers") is None,
                                   reason="--optimizer muon needs emerging-optimizers (run.sh setup installs it)")


def _muon_module():
    from megatron_staged.training.muon import megatron_muon_module

    return megatron_muon_module()


def _ns_orthogonalise(m: torch.Tensor, coefficients) -> torch.Tensor:
    """Newton-Schulz (Bernstein & Newhouse; Jordan et al.'s Muon), written out for the test: on the
    wide orientation, X <- a X + (b A + c A^2) X with A = X X^T, from X = M / ||M||_F."""
    x = m.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for a, b, c in coefficients:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).float()


# the "quintic" schedule of emerging-optimizers (five steps), as published with the package
QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]


@needs_package
def test_muon_update_is_scaled_orthogonalised_momentum():
    """Two steps on a 2-D weight: W moves by lr * sqrt(max(m, n)) * extra * NS5(M) (decoupled decay
    first), M the EMA momentum; NS5(M) has M's singular vectors and singular values near 1."""
    from megatron_staged.training.muon import _compat_class

    cls = _compat_class(_muon_module())
    torch.manual_seed(0)
    rows, cols, lr, beta, wd, extra = 24, 10, 0.05, 0.9, 0.1, 0.7
    w = torch.nn.Parameter(torch.randn(rows, cols))
    opt = cls([w], lr=lr, momentum_beta=beta, use_nesterov=False, weight_decay=wd, split_qkv=False,
              fp32_matmul_prec="high", num_ns_steps=5, scale_mode="spectral", extra_scale_factor=extra,
              pg_collection=None, mode="blockwise")
    momentum = torch.zeros(rows, cols)
    for _ in range(2):
        g = torch.randn(rows, cols)
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        momentum = beta * momentum + (1 - beta) * g
        update = (before * (1 - lr * wd) - w.detach()) / (lr * math.sqrt(max(rows, cols)) * extra)
        torch.testing.assert_close(update, _ns_orthogonalise(momentum, QUINTIC), rtol=1e-4, atol=1e-5)
        # the orthogonalisation itself, by SVD: same singular vectors as M, singular values ~ 1
        u, _, vh = torch.linalg.svd(momentum.double(), full_matrices=False)
        in_basis = u.T @ update.double() @ vh.T
        off_diagonal = in_basis - torch.diag(torch.diagonal(in_basis))
        assert off_diagonal.abs().max() < 1e-4
        assert torch.diagonal(in_basis).min() > 0.6 and torch.diagonal(in_basis).max() < 1.3
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], momentum)


def test_muon_flags_and_refusals(monkeypatch):
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import Config, config_from_args, validate
    from megatron_staged.errors import UserError

    base = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2"]
    cfg = config_from_args(_train_parser("t").parse_args(
        [*base, "--optimizer", "muon", "--muon-momentum", "0.95", "--muon-no-split-qkv", "--muon-use-nesterov",
         "--muon-num-ns-steps", "6", "--muon-tp-mode", "duplicated", "--muon-scale-mode", "unit_rms_norm",
         "--muon-extra-scale-factor", "0.2", "--muon-fp32-matmul-prec", "high"]))
    o = cfg.optim
    assert (o.optimizer, o.muon_momentum, o.muon_split_qkv, o.muon_use_nesterov, o.muon_num_ns_steps,
            o.muon_tp_mode, o.muon_scale_mode, o.muon_extra_scale_factor, o.muon_fp32_matmul_prec) == \
        ("muon", 0.95, False, True, 6, "duplicated", "unit_rms_norm", 0.2, "high")
    assert Config.from_dict(cfg.to_dict()).optim.muon_momentum == 0.95  # the YAML keys are the same fields
    assert Config().optim.optimizer == "adam"  # AdamW stays the default
    validate(cfg, 1)

    def refused(*extra, world=2):
        c = config_from_args(_train_parser("t").parse_args([*base, *extra]))
        with pytest.raises(UserError) as e:
            validate(c, world)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "dist_muon" in refused("--optimizer", "muon", "--use-distributed-optimizer")
    assert "--use-distributed-optimizer" in refused("--optimizer", "dist_muon", "--use-distributed-optimizer")
    assert "--bf16" in refused("--optimizer", "muon", "--fp16")
    assert "--muon-num-ns-steps" in refused("--optimizer", "muon", "--muon-num-ns-steps", "0")

    # without the package: one line saying what to install
    monkeypatch.setitem(sys.modules, "emerging_optimizers.orthogonalized_optimizers", None)
    from megatron_staged.training.muon import megatron_muon_module

    with pytest.raises(UserError) as e:
        megatron_muon_module()
    assert "pip install" in str(e.value) and "emerging-optimizers" in str(e.value) and "\n" not in str(e.value)


def _is_muon_param(key: str, shape: tuple) -> bool:
    """docs/muon.md: Muon takes the 2-D weights of the transformer layers (stacked [L, out, in])."""
    return key.startswith("decoder.layers.") and len(shape) == 3


def _block_diagonal(m: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(m)
    return torch.cat([torch.cat([m, z], 1), torch.cat([z, m], 1)], 0)


@needs_package
def test_muon_distributed_resume_convert_grow(tmp_path):
    """One torchrun job (4 ranks, tests/workers/muon_worker.py): dist_muon at TP2 DP2 trains and
    resumes exactly; convert to TP1 PP2 keeps every state tensor; growth (depth x2 stack/identity,
    width x2) maps Muon's momentum as Adam's m, offline and in-run alike; plain muon at PP2 continues
    from the converted one."""
    from megatron_staged.checkpoint.global_tensors import read_global_tensors, tensor_specs

    n = 6
    base = [*TINY_GPT2, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--lr", "3e-3", "--lr-decay-style", "constant", "--eval-iters", "1", "--eval-interval", "1000"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": base, "out": str(tmp_path), "iters": n}))
    torchrun([str(spec)], nproc=4, timeout=900, script=str(ROOT / "tests" / "workers" / "muon_worker.py"))

    straight, first, second = (losses(tmp_path / f"{k}.jsonl") for k in ("straight", "first", "second"))
    assert straight[n] < straight[1] - 0.05, straight  # Muon + Adam train
    assert {**first, **second} == straight  # exact resume: the same losses, bit for bit

    ck_a, ck_b, ck_g = (tmp_path / k / f"iter_{n // 2:07d}" for k in ("ck_a", "ck_b", "ck_g"))
    specs = tensor_specs(str(ck_a))
    model = {k: s for k, (s, _) in specs.items() if not k.startswith("optimizer.")}
    opt_keys = {k for k in specs if k.startswith("optimizer.state.")}
    # which parameters got Muon and which Adam, read from the checkpoint
    for key, shape in model.items():
        kinds = {k[len("optimizer.state."):-len(key) - 1] for k in opt_keys if k.endswith("." + key)}
        assert kinds == ({"momentum_buffer"} if _is_muon_param(key, shape) else {"exp_avg", "exp_avg_sq"}), key
    a = read_global_tensors(str(ck_a))
    assert all(a[k].abs().sum() > 0 for k in opt_keys if ".momentum_buffer." in k)

    # convert: every tensor unchanged (a TP2 PP1 checkpoint read back from TP1 PP2 shards)
    b = read_global_tensors(str(ck_b))
    assert set(b) == set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # growth: momentum of layer j of the grown model, from source layer j % 4 (stack), width x2
    g = read_global_tensors(str(ck_g), [k for k in tensor_specs(str(ck_g)) if ".momentum_buffer." in k])
    L = model["decoder.layers.mlp.linear_fc1.weight"][0]
    residual_outputs = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
    for key in ("self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
                "self_attention.linear_qkv.weight"):
        src = a[f"optimizer.state.momentum_buffer.decoder.layers.{key}"]
        dst = g[f"optimizer.state.momentum_buffer.decoder.layers.{key}"]
        assert dst.shape == (2 * L, 2 * src.shape[1], 2 * src.shape[2])
        for j in range(2 * L):
            m = src[j % L] / 2
            if j >= L and key in residual_outputs:  # identity init: zeroed residual outputs, fresh momentum
                assert not dst[j].any(), (key, j)
            elif key.endswith("linear_qkv.weight"):  # per query group; the same values, each twice
                got = dst[j][dst[j] != 0].sort().values
                want = torch.cat([m.flatten(), m.flatten()])
                assert torch.equal(got, want[want != 0].sort().values), (key, j)
            else:
                assert torch.equal(dst[j], _block_diagonal(m)), (key, j)

    # the same growth in-run (the live shards of a dist_muon job as the source) trains exactly as
    # the offline-grown checkpoint does
    live, offline = losses(tmp_path / "live.jsonl"), losses(tmp_path / "offline.jsonl")
    assert set(live) == set(offline) == {n // 2 + 1, n // 2 + 2} and live == offline, (live, offline)

    zero = losses(tmp_path / "zero.jsonl")  # nothing for Muon: Adam alone trains it
    assert set(zero) == {1, 2, 3, 4} and zero[4] < zero[1], zero

    after = losses(tmp_path / "after.jsonl")
    assert set(after) == {n // 2 + 1, n // 2 + 2}
    assert all(math.isfinite(v) and v < straight[1] for v in after.values()), after
