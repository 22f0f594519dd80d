"""Grown checkpoints against an independent oracle (tests/oracle.py: no megatron_staged import).

Sources are trained 4 iterations at a high LR (5e-2) so that every bias and norm is far from its
initial value (|delta| ~ 0.1): a mishandled bias or norm then moves the loss. Four architectures:
gpt2 tied (distributed optimizer), gpt2 untied (non-distributed optimizer), llama with GQA
(untied), llama tied without GQA. Growth runs through ``megatron-staged grow`` at TP/PP layouts
1x1, 1x2, 2x1 and 2x2 (one torchrun job per world size runs several grow commands), for every
placement (interleave, stack, middle, explicit map) and init (identity, copy, random), with and
without width x2 and width noise. Checked: every tensor of the grown state (weights, fp32 copies,
m, v) equals the oracle exactly; the oracle's own pure-torch forward gives the source's loss on
the grown tensors; the training state (iteration, consumed samples, FLOPs, Adam step, LR schedule
step S_pre/rho and re-warmup) is carried over.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import oracle as O
from conftest import ROOT, run_cli, torchrun

ARCH = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "5e-2", "--lr-warmup-iters", "1",
        "--lr-decay-iters", "100", "--train-iters", "4", "--log-interval", "1", "--eval-iters", "1",
        "--progress-bar", "off"]
SOURCES = {
    "gpt2": ["--model-family", "gpt2", "--use-distributed-optimizer"],
    "gpt2u": ["--model-family", "gpt2", "--untie-embeddings-and-output-weights"],  # non-distributed optimizer
    "llama": ["--model-family", "llama", "--group-query-attention", "--num-query-groups", "2",
              "--ffn-hidden-size", "96", "--use-distributed-optimizer"],
    # + tied (yaml); per-head query/key norms (Qwen3's --qk-layernorm)
    "llamat": ["--model-family", "llama", "--ffn-hidden-size", "96", "--use-distributed-optimizer", "--qk-layernorm"],
}

# name: (source, world, grow flags, oracle: depth map written out from the placement's definition, init, width)
CASES = {
    "gpt2_interleave_identity_w1": ("gpt2", 1, ["--depth-factor", "2"], [0, 0, 1, 1], "identity", False),
    "gpt2_interleave_identity_pp2": ("gpt2", 2, ["--depth-factor", "2", "--target-pipeline-model-parallel-size", "2"],
                                     [0, 0, 1, 1], "identity", False),
    "gpt2u_stack_copy_width_w1": ("gpt2u", 1, ["--depth-factor", "2", "--depth-placement", "stack",
                                              "--depth-init", "copy", "--width-factor", "2"], [0, 1, 0, 1], "copy", True),
    "gpt2u_interleave_identity_width_tp2pp2": ("gpt2u", 4, ["--depth-factor", "2", "--width-factor", "2",
                                                           "--target-tensor-model-parallel-size", "2",
                                                           "--target-pipeline-model-parallel-size", "2"],
                                               [0, 0, 1, 1], "identity", True),
    "llama_width_tp2": ("llama", 2, ["--width-factor", "2", "--target-tensor-model-parallel-size", "2"],
                        [0, 1], "identity", True),
    "llama_map_random_w1": ("llama", 1, ["--depth-map", "0,new,1,1", "--depth-init", "random"],
                            [0, None, 1, 1], "random", False),
    "llama_map_random_tp2": ("llama", 2, ["--depth-map", "0,new,1,1", "--depth-init", "random",
                                          "--target-tensor-model-parallel-size", "2"], [0, None, 1, 1], "random", False),
    "llamat_middle_identity_width_w1": ("llamat", 1, ["--num-layers", "3", "--depth-placement", "middle",
                                                      "--width-factor", "2"], [0, 0, 1], "identity", True),
    "llamat_stack_identity_width_tp2pp2": ("llamat", 4, ["--depth-factor", "2", "--depth-placement", "stack",
                                                         "--width-factor", "2", "--target-tensor-model-parallel-size", "2",
                                                         "--target-pipeline-model-parallel-size", "2"],
                                           [0, 1, 0, 1], "identity", True),
    "gpt2_width_noise_w1": ("gpt2", 1, ["--width-factor", "2", "--width-noise", "0.01"], [0, 1], "noise", True),
    # optimizer-side option: the grown checkpoint is the same; training resumed from it differs
    "gpt2_interleave_identity_freshbc_w1": ("gpt2", 1, ["--depth-factor", "2", "--fresh-moments", "bias-corrected"],
                                            [0, 0, 1, 1], "identity", False),
}
NOISE_STD = 0.01
DEFAULT_RHO = {"depth": 1.4, "width": 1.8}  # docs/design.md


@pytest.fixture(scope="session")
def oracle_sources(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("oracle_sources")
    (root / "tied.yaml").write_text("untie_embeddings_and_output_weights: false\n")

    def train(name):
        extra = ["--config", str(root / "tied.yaml")] if name == "llamat" else []
        run_cli(["train", *extra, *SOURCES[name], *ARCH, *corpus, "--save", str(root / name)])
        return name, str(root / name)

    with ThreadPoolExecutor(len(SOURCES)) as ex:
        return dict(ex.map(train, SOURCES))


@pytest.fixture(scope="session")
def oracle_grown(tmp_path_factory, oracle_sources):
    root = tmp_path_factory.mktemp("oracle_grown")
    by_world: dict[int, list] = {}
    for name, (src, world, flags, *_rest) in CASES.items():
        by_world.setdefault(world, []).append(["--load", oracle_sources[src], "--save", str(root / name), *flags])
    for world, cases in sorted(by_world.items()):
        spec = root / f"cases_{world}.json"
        spec.write_text(json.dumps(cases))
        torchrun([str(spec)], nproc=world, script=str(ROOT / "tests/workers/grow_cli_worker.py"), timeout=900)
    return {name: str(root / name) for name in CASES}


def _state_keys(t: dict) -> list:
    return [k for k in t if O.split_key(k) is not None]


def test_grown_state_equals_independent_oracle(oracle_sources, oracle_grown):
    """Every weight, fp32 copy and moment of every grown checkpoint == the paper's equations."""
    checked = set()
    for name, (src_name, world, flags, dmap, init, width) in CASES.items():
        src = O.read_tensors(oracle_sources[src_name])
        a = O.describe(O.read_common(oracle_sources[src_name]))
        got = O.read_tensors(oracle_grown[name])
        want = O.grow_state(src, a, depth_map=dmap, init="identity" if init == "noise" else init, width=width)
        assert set(_state_keys(got)) == set(want), f"{name}: keys differ: {set(_state_keys(got)) ^ set(want)}"
        big = O.grown_arch(a, layers=len(dmap), width=width)
        for key, exp in want.items():
            kind, mkey = O.split_key(key)
            layers = exp if isinstance(exp, list) else [exp]
            for j, e in enumerate(layers):
                g = got[key][j] if isinstance(exp, list) else got[key]
                if e is None:  # a random (fresh) layer: checked in test_random_layers_*
                    continue
                assert g.shape == e.shape, f"{name} {key}[{j}]: {tuple(g.shape)} != {tuple(e.shape)}"
                if init == "noise":
                    off = O.off_diagonal_mask(mkey, big, g.shape)
                    if off is not None:
                        if kind == "param":
                            n = g[off]
                            assert abs(float(n.std()) - NOISE_STD) < 0.2 * NOISE_STD and abs(float(n.mean())) < 2e-3, \
                                f"{name} {key}: off-diagonal noise std {float(n.std()):.4g}"
                        else:
                            assert g[off].abs().max() == 0, f"{name} {key}: moments of noisy blocks must be zero"
                        g, e = g[~off], e[~off]
                torch.testing.assert_close(g.float(), e, rtol=0, atol=0, msg=lambda m: f"{name} {key}[{j}]: {m}")
                checked.add((src_name, kind))
    for s in SOURCES:
        for kind in O.KINDS:
            if kind != "param" or s != "gpt2u":
                assert (s, kind) in checked, f"nothing of kind {kind} checked for {s}"


def test_oracle_forward_gives_source_loss_on_grown_tensors(oracle_sources, oracle_grown):
    """Loss preservation, by a forward written in the tests on global tensors.

    Also shows the check can fail: a grown identity layer that kept its (trained, non-zero)
    linear_fc2 bias, or a final norm whose (trained) bias was not split, moves the loss.
    """
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (2, 17), generator=g)
    for name, (src_name, world, flags, dmap, init, width) in CASES.items():
        src = O.read_tensors(oracle_sources[src_name])
        a = O.describe(O.read_common(oracle_sources[src_name]))
        big = O.grown_arch(a, layers=len(dmap), width=width)
        got = O.read_tensors(oracle_grown[name])
        before = O.forward_loss(src, a, tokens)
        after = O.forward_loss(got, big, tokens)
        if "decoder.layers.self_attention.q_layernorm.weight" in src:  # sensitivity: the q/k norms are used
            no_qk = {k: v for k, v in src.items() if "q_layernorm" not in k and "k_layernorm" not in k}
            assert abs(O.forward_loss(no_qk, a, tokens) - before) > 1e-4, f"{name}: q/k norms have no effect"
        if init == "identity":
            assert abs(after - before) < 1e-5 * before, f"{name}: loss {before} -> {after}"
            ref = O.forward_loss(O.stacked(O.grow_state(src, a, depth_map=dmap, width=width)), big, tokens)
            assert abs(ref - before) < 1e-5 * before, f"{name}: the oracle itself is not loss-preserving"
            if a["family"] == "gpt2":
                if len(dmap) > a["layers"]:  # sensitivity: keep the copied fc2 bias in the new layers
                    bad = dict(got)
                    k = "decoder.layers.mlp.linear_fc2.bias"
                    bad[k] = O.stacked(O.grow_state(src, a, depth_map=dmap, init="copy", width=width))[k]
                    assert abs(O.forward_loss(bad, big, tokens) - before) > 1e-3, f"{name}: bias has no effect"
                if width and a["tied"]:  # sensitivity: final-norm bias duplicated instead of split
                    bad = dict(got)
                    k = "decoder.final_layernorm.bias"
                    bad[k] = torch.cat([src[k], src[k]]).float()
                    assert abs(O.forward_loss(bad, big, tokens) - before) > 1e-3, f"{name}: norm bias has no effect"
        elif init == "copy":  # a block running twice is not an identity (REFERENCE.md)
            assert abs(after - before) > 1e-4, f"{name}: copying layers unexpectedly preserved the loss"
        assert math.isfinite(after)


def test_random_layers_are_fresh_and_layout_independent(oracle_sources, oracle_grown):
    """--depth-init random: fresh layers get zero moments, the target model's own init (init_method_std
    weights, megatron's scaled std/sqrt(2L) for the residual outputs, norms 1) whatever the layout."""
    a = O.describe(O.read_common(oracle_sources["llama"]))
    src = O.read_tensors(oracle_sources["llama"])
    w1 = O.read_tensors(oracle_grown["llama_map_random_w1"])
    tp2 = O.read_tensors(oracle_grown["llama_map_random_tp2"])
    fresh = [1, 3]  # map 0,new,1,1: layer 1 has no source, layer 3 repeats layer 1's source
    std = 0.02
    for key in _state_keys(w1):
        kind, mkey = O.split_key(key)
        if not mkey.startswith("decoder.layers."):
            continue
        torch.testing.assert_close(w1[key][fresh], tp2[key][fresh], rtol=0, atol=0, msg=f"{key} depends on layout")
        for j in fresh:
            t = w1[key][j]
            if kind in ("exp_avg", "exp_avg_sq"):
                assert t.abs().max() == 0, f"{key}[{j}]: fresh layer needs zero moments"
                continue
            if key.startswith(O.OPT):  # the fp32 copy equals the model weight
                torch.testing.assert_close(t, w1[mkey][j], rtol=0, atol=0)
            if mkey.endswith("layer_norm_weight"):
                assert torch.all(t == 1), f"{key}[{j}] is not a fresh norm"
            elif t.dim() == 2:
                want = std / math.sqrt(2 * 4) if mkey.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
                assert abs(float(t.std()) - want) < 0.15 * want, f"{key}[{j}]: std {float(t.std()):.4g} != {want:.4g}"
                for s in range(a["layers"]):
                    assert not torch.equal(t, src[mkey][s].to(t.dtype)), f"{key}[{j}] copies source layer {s}"


def test_training_state_carried_over(oracle_sources, oracle_grown):
    """Iteration, consumed samples, FLOPs so far and the Adam step are kept; the LR schedule jumps to
    round(S_pre / rho) with rho = 1.4 (depth), 1.8 (width) or their product, with a 150-step re-warmup."""
    for name, (src_name, world, flags, dmap, init, width) in CASES.items():
        s, g = O.read_common(oracle_sources[src_name]), O.read_common(oracle_grown[name])
        ss, gs = s["train_state"], g["train_state"]
        assert g["iteration"] == s["iteration"] == gs["iteration"] == 4
        for k in ("consumed_train_samples", "flops_so_far", "optimizer_step"):
            assert gs[k] == ss[k], f"{name}: {k} {ss[k]} -> {gs[k]}"
        assert gs["optimizer_step"] == 4
        depth = dmap != list(range(len(dmap)))
        rho = (DEFAULT_RHO["depth"] if depth else 1.0) * (DEFAULT_RHO["width"] if width else 1.0)
        sched = g["opt_param_scheduler"]
        assert sched["num_steps"] == round(s["opt_param_scheduler"]["num_steps"] / rho), f"{name}: {sched}"
        assert sched["rewarmup_begin"] == sched["num_steps"] and sched["rewarmup_iters"] == 150
        h = gs["stage_history"][-1]
        assert h["rho"] == pytest.approx(rho) and h["iteration"] == 4
        assert (h["to"]["num_layers"], h["to"]["hidden_size"]) == (len(dmap), 128 if width else 64)


def test_resume_after_offline_grow_applies_fresh_moments(oracle_grown, corpus, tmp_path):
    """``grow --fresh-moments bias-corrected`` then ``train --load``: the first step moves the elements
    whose moments are zero as AdamW at step 1, all others as AdamW at the kept step 5; the default
    (``zero``) grown checkpoint resumed the same way moves every element at the kept step."""
    lr = 5e-2 * 0.5 * (1 + math.cos(math.pi * (3 - 1) / (100 - 1))) / 150  # step round(4/1.4)=3, ramp 1/150
    runs = {}
    for name in ("gpt2_interleave_identity_freshbc_w1", "gpt2_interleave_identity_w1"):
        out = tmp_path / name
        runs[name] = out
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda n: run_cli(["train", "--load", oracle_grown[n], *SOURCES["gpt2"], *ARCH[8:], *corpus,
                                       "--train-iters", "5", "--save", str(runs[n])]), runs))
    for name, out in runs.items():
        common = O.read_common(oracle_grown[name])
        mode = common["train_state"]["stage_history"][-1]["spec"]["fresh_moments"]
        assert mode == ("bias-corrected" if "freshbc" in name else "zero")
        before, after = O.read_tensors(oracle_grown[name]), O.read_tensors(str(out))
        assert O.read_common(str(out))["train_state"]["optimizer_step"] == 5
        errs = O.adamw_step_errors(before, after, lr, 5, fresh_step=1 if mode == "bias-corrected" else 5)
        kept = [e[0] for e in errs.values() if e[0] is not None]
        fresh = [e[2] for e in errs.values() if e[2] is not None]
        assert len(kept) > 10 and len(fresh) >= 4, (name, errs)
        assert max(kept) < 1e-3, f"{name}: carried elements are not AdamW at step 5 ({max(kept):.2e})"
        assert max(fresh) < 1e-3, f"{name}: fresh elements are not AdamW at the expected step ({max(fresh):.2e})"
