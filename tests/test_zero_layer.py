"""Zero/one-layer progressive training (Bu 2025; REFERENCE.md 3, docs/zero_one_layer.md).

One torchrun launch (2 processes, tests/workers/zero_layer_worker.py) runs every multi-process
scenario; the checks read its results and checkpoints. The copy inits are checked against
``tests/oracle.py``'s checkpoint reader with the depth maps written out literally here.
"""
from __future__ import annotations

import json

import pytest
import torch

import oracle as O
from conftest import ROOT, torchrun

LAYER = "decoder.layers."


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("zero_layer")
    (root / "data.json").write_text(json.dumps(corpus))
    torchrun([str(root), str(root / "data.json")], nproc=2, timeout=1500,
             script=str(ROOT / "tests/workers/zero_layer_worker.py"))
    res = json.loads((root / "results.json").read_text())
    for r in res.values():  # JSON keys are strings
        if "losses" in r:
            r["losses"] = {int(k): v for k, v in r["losses"].items()}
    return root, res


def _records(root, name):
    return [json.loads(l) for l in (root / f"{name}.jsonl").read_text().splitlines() if l.strip()]


def test_zero_and_one_layer_models_train_at_tp2_and_resume_exactly(runs):
    root, res = runs
    for name, layers, grows_at, resumed, since in (("zero", 0, 4, "zero_from3", 3), ("one", 1, 3, "one_from2", 2)):
        r = res[name]
        h = r["history"][-1]
        assert (h["from"]["num_layers"], h["from"]["tp"], h["from"]["pp"], h["iteration"]) == (layers, 2, 1, grows_at)
        losses = r["losses"]
        assert sorted(losses) == [1, 2, 3, 4, 5, 6]
        assert losses[grows_at] < losses[1] - 0.05, losses  # the small model learns
        # resumed from the small model's checkpoint (and expanding again on the way): bit for bit
        again = res[resumed]["losses"]
        assert {i: again[i] for i in range(since + 1, 7)} == {i: losses[i] for i in range(since + 1, 7)}, name
        assert res[resumed]["final_eval"] == r["final_eval"]
        assert res[resumed]["history"][-1]["eval_loss_after"] == h["eval_loss_after"]


def test_zero_layer_model_is_embedding_norm_and_head_and_its_flops_are_the_logits(runs):
    root, res = runs
    sd = O.read_tensors(str(root / "zero" / "iter_0000003"))
    model_keys = {k for k in sd if not k.startswith(O.OPT)}
    assert not any(k.startswith(LAYER) for k in sd), sorted(sd)
    assert {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
            "decoder.final_layernorm.weight", "decoder.final_layernorm.bias"} <= model_keys
    # FLOPs: only the logits GEMM [tokens, h] x [h, V]: 2 flops per multiply-add, x3 for forward,
    # weight-gradient and input-gradient passes (independent of training/flops.py)
    V, h = sd["embedding.word_embeddings.weight"].shape
    expected = 3 * 2 * (8 * 32) * h * V
    recs = [r for r in _records(root, "zero") if "loss" in r][:4]  # before the expansion
    for i, r in enumerate(recs):
        assert r["flops_so_far"] == pytest.approx((i + 1) * expected, rel=1e-12), (i, r["flops_so_far"], expected)


def test_expansion_yields_the_layer_count_and_layout(runs):
    root, res = runs
    z = res["zero"]
    h = z["history"][-1]
    assert (h["from"]["num_layers"], h["from"]["tp"], h["from"]["pp"]) == (0, 2, 1)
    assert (h["to"]["num_layers"], h["to"]["tp"], h["to"]["pp"]) == (4, 1, 2)
    assert (z["layers"], z["tp"], z["pp"]) == (4, 1, 2)
    assert h["spec"]["depth_map"] == [None] * 4
    grown = O.read_tensors(str(root / "zero" / "iter_0000004"))
    stacked = [k for k in grown if k.startswith(LAYER)]
    assert stacked and all(grown[k].shape[0] == 4 for k in stacked)
    one = res["one"]["history"][-1]
    assert (one["iteration"], one["from"]["num_layers"], one["to"]["num_layers"]) == (3, 1, 4)  # at_fraction 0.5 of 6
    assert (one["to"]["tp"], one["to"]["pp"], res["one"]["layers"]) == (2, 1, 4)
    assert one["spec"]["depth_map"] == [0, 0, 0, 0]


def test_zero_init_preserves_the_loss_and_keeps_the_lr(runs):
    root, res = runs
    h = res["zero"]["history"][-1]
    before, after = h["eval_loss_before"], h["eval_loss_after"]
    assert abs(after - before) <= 1e-5 * abs(before), (before, after)  # float32 round-off (TP2 -> PP2)
    # the expansion keeps the LR schedule: no rho jump, no re-warmup
    assert (h["rho"], h["rewarmup_iters"]) == (1.0, 0)
    assert h["schedule_step_after"] == h["schedule_step_before"] == 4
    # WSD over 6 iterations (warmup 1, the last 1 decaying to 0): the LR after each step, as logged
    lrs = [r["lr"] for r in _records(root, "zero") if "lr" in r]
    assert lrs == pytest.approx([3e-3] * 5 + [0.0], abs=1e-12)  # a re-warmup would lower 5
    # new layers: zero residual outputs with zero moments; random input weights with zero moments
    sd = O.read_tensors(str(root / "zero" / "iter_0000004"))
    for sfx in O.RESIDUAL_OUT:
        for key in (LAYER + sfx, f"{O.OPT}param.{LAYER}{sfx}", f"{O.OPT}exp_avg.{LAYER}{sfx}",
                    f"{O.OPT}exp_avg_sq.{LAYER}{sfx}"):
            assert torch.count_nonzero(sd[key]) == 0, key
    qkv = sd[LAYER + "self_attention.linear_qkv.weight"]
    assert float(qkv.std()) == pytest.approx(0.02, rel=0.1)  # the target's own init (--init-method-std)
    assert torch.count_nonzero(sd[f"{O.OPT}exp_avg.{LAYER}self_attention.linear_qkv.weight"]) == 0


def test_training_continues_after_expansion(runs):
    root, res = runs
    for name in ("zero", "one"):
        r = res[name]
        h = r["history"][-1]
        after = [r["losses"][i] for i in sorted(r["losses"]) if i > h["iteration"]]
        assert after and all(l == l and l < 20 for l in after), (name, r["losses"])
        assert r["final_eval"] < h["eval_loss_after"], (name, h["eval_loss_after"], r["final_eval"])


def test_resume_across_the_expansion_is_exact(runs):
    root, res = runs
    a, b = res["zero"], res["zero_from4"]
    assert (b["layers"], b["tp"], b["pp"]) == (4, 1, 2)
    assert {i: b["losses"][i] for i in (5, 6)} == {i: a["losses"][i] for i in (5, 6)}
    assert b["final_eval"] == a["final_eval"]


# new layer j of a 6-layer model grown from 2 layers reads source layer MAPS[init][j]
MAPS = {"copy-stack": [0, 1, 0, 1, 0, 1], "copy-interleave": [0, 0, 0, 1, 1, 1], "copy-last": [0, 1, 1, 1, 1, 1]}


@pytest.mark.parametrize("init", list(MAPS))
def test_copy_inits_equal_the_source_layer_exactly(runs, init):
    root, res = runs
    assert res[init]["depth_map"] == MAPS[init] and (res[init]["tp"], res[init]["pp"]) == (1, 2)
    src, grown = O.read_tensors(str(root / "two")), O.read_tensors(str(root / init))
    assert set(src) == set(grown)
    for key, t in grown.items():
        if LAYER in key:  # the weight, its fp32 copy and both Adam moments of every new layer
            assert t.shape[0] == 6
            for j, i in enumerate(MAPS[init]):
                assert torch.equal(t[j], src[key][i]), (key, j, i)
        else:
            assert torch.equal(t, src[key]), key
    s, g = O.read_common(str(root / "two")), O.read_common(str(root / init))
    assert g["opt_param_scheduler"]["num_steps"] == s["opt_param_scheduler"]["num_steps"]  # LR unchanged


# ---- config-time checks (no process launched) ---------------------------------------------------

def _cfg(layers: int, **optim):
    from megatron_staged.config import Config

    c = Config()
    c.model.num_layers = layers
    c.data.mock_data = True
    c.training.train_iters = 1000
    for k, v in optim.items():
        setattr(c.optim, k, v)
    return c


def test_config_accepts_zero_and_one_layers_where_meaningful():
    from megatron_staged.config import validate
    from megatron_staged.errors import UserError
    from megatron_staged.growth.spec import GrowthRequest, make_spec

    validate(_cfg(0), 2)
    validate(_cfg(1), 2)
    bad = _cfg(0)
    bad.parallel.pipeline_model_parallel_size = 2
    with pytest.raises(UserError, match=r"^a zero-layer model cannot be pipelined; use --pipeline-model-parallel-size 1$"):
        validate(bad, 2)
    bad = _cfg(1)
    bad.parallel.pipeline_model_parallel_size = 2
    with pytest.raises(UserError, match=r"--num-layers 1 is not divisible by --pipeline-model-parallel-size 2"):
        validate(bad, 2)
    for init in ("copy-stack", "copy-interleave", "copy-last"):
        with pytest.raises(UserError, match=rf"^--depth-init {init}: a zero-layer model has no layer to copy; use "
                                            r"random or zero$"):
            make_spec(_cfg(0), GrowthRequest(num_layers=4, depth_init=init))
    with pytest.raises(UserError, match=r"staging.stages\[0\].depth_init copy-last: a zero-layer model"):
        make_spec(_cfg(0), GrowthRequest.from_stage({"num_layers": 4, "depth_init": "copy-last"}, 0), 0)


def test_expansion_point_warnings():
    from megatron_staged.config import validate
    from megatron_staged.staging.stages import expansion_warnings, plan_stages
    from megatron_staged.training.state import TrainState

    def warnings_for(cfg, stage):
        validate(cfg, 1)
        return expansion_warnings(cfg, plan_stages(cfg, [stage], 1, TrainState()))

    expand = {"num_layers": 8, "depth_init": "random"}
    # WSD decaying over the last 10%: 0.8 T (the default point) is in the stable phase
    assert warnings_for(_cfg(0, lr_decay_style="WSD"), dict(expand)) == []
    late = warnings_for(_cfg(1, lr_decay_style="WSD"), dict(expand, at_iteration=950))
    assert len(late) == 1 and late[0].startswith("warning: staging.stages[0] expands 1 -> 8 layers at iteration 950, "
                                                 "after the WSD decay starts (iteration 900)")
    assert "\n" not in late[0]
    cos = warnings_for(_cfg(0, lr_decay_style="cosine"), dict(expand))
    assert len(cos) == 1 and "late in the cosine decay" in cos[0]
    assert warnings_for(_cfg(0, lr_decay_style="cosine"), dict(expand, at_fraction=0.2)) == []
    # a growth that is not an expansion (Shen et al.'s staged growth) is not warned about
    assert warnings_for(_cfg(4, lr_decay_style="cosine"), {"depth_factor": 2, "at_iteration": 900}) == []
    # an at_flops point sits at the iteration that reaches it: 950.5 iterations' FLOPs of the 1-layer
    # model are reached after iteration 951 (FLOPs per iteration from the model: 6 N D-style count
    # checked against hand values in test_plan.py)
    from megatron_staged.config import resolve_model
    from megatron_staged.training.flops import flops_per_iteration

    def one():  # as the trainer holds it: model and vocabulary resolved
        c = _cfg(1, lr_decay_style="WSD")
        c.model.padded_vocab_size, c.training.micro_batch_size, c.training.global_batch_size = 512, 1, 8
        resolve_model(c.model)
        return c
    per_iter = flops_per_iteration(one().model, one().training.global_batch_size)
    late = warnings_for(one(), dict(expand, at_flops=950.5 * per_iter))
    assert len(late) == 1 and late[0].startswith("warning: staging.stages[0] expands 1 -> 8 layers at iteration 951 "
                                                 "(at_flops "), late
    assert warnings_for(one(), dict(expand, at_flops=500.5 * per_iter)) == []
    # beyond the run: never reached, nothing to warn about (the trainer names it at the end)
    assert warnings_for(one(), dict(expand, at_flops=2000 * per_iter)) == []
