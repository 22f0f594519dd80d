"""Uneven pipeline stages (Megatron-LM's --decoder-first/last-pipeline-num-layers and
--account-for-embedding/loss-in-pipeline-split): the split each pipeline rank builds, checked against
megatron-core's own ``get_num_layers_to_build`` / ``get_transformer_layer_offset``; training,
resume, convert and depth growth at uneven layouts, each compared with the same run at PP 1 (no
pipeline), which is the oracle; bad values refused in one line before anything is built."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_staged.config import parse_config, pipeline_layer_counts, validate
from megatron_staged.errors import UserError
from megatron_staged.staging.stages import plan_stages
from megatron_staged.training.state import TrainState

from conftest import ROOT, torchrun

BASE = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--num-layers", "5",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "3", "--lr", "1e-2", "--lr-warmup-iters", "1", "--train-iters", "4",
        "--log-interval", "1", "--eval-iters", "1", "--progress-bar", "off", "--use-distributed-optimizer",
        "--vocab-padding", "lcm"]
PP1 = ["--pipeline-model-parallel-size", "1"]
FIRST1 = ["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "1"]  # 1 | 2 | 2
TOL = 2e-5  # float32 round-off: the layouts sum the same terms in another order


def _megatron_split(cfg) -> list:
    """[rank][chunk] -> that chunk's global layer indices, from megatron-core's own functions."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_staged.config import virtual_pipeline_size

    p, vp = cfg.parallel, virtual_pipeline_size(cfg)
    tc = TransformerConfig(num_layers=cfg.model.num_layers, hidden_size=32, num_attention_heads=4,
                           pipeline_dtype=torch.float32,
                           pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                           virtual_pipeline_model_parallel_size=vp,
                           num_layers_in_first_pipeline_stage=p.decoder_first_pipeline_num_layers,
                           num_layers_in_last_pipeline_stage=p.decoder_last_pipeline_num_layers,
                           account_for_embedding_in_pipeline_split=p.account_for_embedding_in_pipeline_split,
                           account_for_loss_in_pipeline_split=p.account_for_loss_in_pipeline_split)
    out = []
    for rank in range(p.pipeline_model_parallel_size):
        chunks = []
        for v in range(vp or 1):
            vs = v if vp else None
            n = get_num_layers_to_build(tc, vp_stage=vs, pp_rank=rank)
            offset = get_transformer_layer_offset(tc, vp_stage=vs, pp_rank=rank)
            chunks.append(list(range(offset, offset + n)))
        out.append(chunks)
    return out


@pytest.mark.parametrize("argv,world,expected", [
    ([*FIRST1], 3, [[1], [2], [2]]),
    (["--num-layers", "5", "--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "1"], 2,
     [[4], [1]]),
    (["--num-layers", "7", "--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
      "--decoder-last-pipeline-num-layers", "2"], 4, [[1], [2], [2], [2]]),
    # the embedding counted as a layer: (3 + 1) / 2 per stage, the first one transformer layer short
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split"], 2,
     [[1], [2]]),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "3", "--account-for-embedding-in-pipeline-split",
      "--account-for-loss-in-pipeline-split"], 3, [[1], [2], [1]]),
    # with interleaving: (6 + 2) / 2 = 4 per stage, 2 virtual stages of 2; first and last chunk one short
    (["--num-layers", "6", "--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split",
      "--account-for-loss-in-pipeline-split", "--num-layers-per-virtual-pipeline-stage", "2",
      "--global-batch-size", "4"], 2, [[1, 2], [2, 1]]),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "2",
      "--decoder-last-pipeline-num-layers", "2", "--num-virtual-stages-per-pipeline-rank", "2"], 3,
     [[1, 1], [2, 2], [1, 1]]),
])
def test_split_is_megatron_cores(argv, world, expected):
    cfg = parse_config([*BASE, *argv])
    validate(cfg, world)
    counts = pipeline_layer_counts(cfg)
    assert counts == expected  # worked by hand
    ranges = _megatron_split(cfg)
    assert [[len(c) for c in r] for r in ranges] == expected
    # megatron's offsets tile 0..L-1 exactly once
    assert sorted(i for r in ranges for c in r for i in c) == list(range(cfg.model.num_layers))


@pytest.mark.parametrize("argv,world,message", [
    (["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "2"], 3,
     "leaves 3, which does not split evenly over the 2 other pipeline stage(s)"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2",
      "--decoder-last-pipeline-num-layers", "2"], 2, "leaves 1, which does not split evenly over the 0 other"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "0"], 2, "must be >= 1"),
    (["--decoder-first-pipeline-num-layers", "1"], 1, "need --pipeline-model-parallel-size > 1"),
    ([*FIRST1, "--account-for-loss-in-pipeline-split"], 3, "are exclusive"),
    (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split",
      "--account-for-loss-in-pipeline-split"], 2, "(with the embedding and loss counted as a layer: 7) is not divisible"),
    ([*FIRST1, "--num-layers-per-virtual-pipeline-stage", "1"], 3, "--num-virtual-stages-per-pipeline-rank"),
    ([*FIRST1, "--num-virtual-stages-per-pipeline-rank", "2"], 3, "not divisible by its 2 virtual pipeline stages"),
])
def test_bad_splits_are_one_line(argv, world, message):
    with pytest.raises(UserError) as e:  # later flags win, as in argparse
        validate(parse_config([*BASE, *argv]), world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_growth_stage_keeps_the_split_or_names_its_keys_before_training():
    cfg = parse_config([*BASE, *FIRST1])
    validate(cfg, 3)
    # 5 -> 9 layers: the first stage keeps its 1 layer, the other two take 4 each
    (stage,) = plan_stages(cfg, [{"at_iteration": 2, "num_layers": 9}], 3, TrainState())
    with pytest.raises(UserError) as e:  # 10 layers: 9 do not split over the 2 other stages
        plan_stages(cfg, [{"at_iteration": 2, "num_layers": 10}], 3, TrainState())
    msg = str(e.value)
    assert msg.startswith("staging.stages[0]: ") and "staging.stages[0].target_decoder_first_pipeline_num_layers" in msg
    assert "\n" not in msg
    plan_stages(cfg, [{"at_iteration": 2, "num_layers": 10, "target_decoder_first_pipeline_num_layers": 2}], 3,
                TrainState())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    (d / "grow.yaml").write_text("staging:\n  stages:\n    - {at_iteration: 2, num_layers: 9, eval_iters: 1}\n")
    (d / "grow_last.yaml").write_text(  # uneven first -> an uneven last stage of 1 (2 | 2 | 1 -> 4 | 4 | 1)
        "staging:\n  stages:\n    - {at_iteration: 2, num_layers: 9, eval_iters: 1, "
        "target_decoder_first_pipeline_num_layers: 0, target_decoder_last_pipeline_num_layers: 1}\n")
    grow = ["--config", str(d / "grow.yaml")]
    emb_loss = ["--num-layers", "4", "--pipeline-model-parallel-size", "3", "--account-for-embedding-in-pipeline-split",
                "--account-for-loss-in-pipeline-split"]
    vp8 = ["--num-layers", "8", "--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "2",
           "--decoder-last-pipeline-num-layers", "2", "--num-virtual-stages-per-pipeline-rank", "2"]
    ev = [*BASE, "--no-load-optim", "--no-load-rng"]
    src = f"{d}/first1/iter_0000002"
    cases = [
        {"name": "pp1", "flags": [*BASE, *PP1]},
        {"name": "first1", "flags": [*BASE, *FIRST1, "--save", f"{d}/first1", "--save-interval", "2"]},
        {"name": "resume_pp1", "flags": [*BASE, *PP1, "--load", src]},
        {"name": "pp1_4", "flags": [*BASE, *PP1, "--num-layers", "4"]},
        {"name": "emb_loss", "flags": [*BASE, *emb_loss]},
        {"name": "pp1_8", "flags": [*BASE, *PP1, "--num-layers", "8"]},
        {"name": "vp8", "flags": [*BASE, *vp8]},
        {"name": "grow_pp1", "flags": [*BASE, *PP1, *grow]},
        {"name": "grow_first1", "flags": [*BASE, *FIRST1, *grow]},
        {"name": "grow_to_last1", "flags": [*BASE, *FIRST1, "--config", str(d / "grow_last.yaml")]},
        # a checkpoint saved at 1 | 2 | 2: converted to 2 | 2 | 1, grown offline to 10 layers as 2 | 4 | 4
        {"name": "c_last1", "kind": "tool", "flags": ["convert", "--no-optimizer", "--load", src, "--save", f"{d}/c",
                                                    "--target-decoder-last-pipeline-num-layers", "1"]},
        {"name": "g_first2", "kind": "tool", "flags": ["grow", "--load", src, "--save", f"{d}/g", "--num-layers", "10",
                                                     "--target-decoder-first-pipeline-num-layers", "2"]},
        {"name": "e_src", "kind": "eval", "flags": [*ev, *PP1, "--load", src]},
        {"name": "e_c_last1", "kind": "eval", "flags": [*ev, "--pipeline-model-parallel-size", "3",
                                                       "--decoder-last-pipeline-num-layers", "1", "--load", f"{d}/c"]},
        {"name": "e_g_first2", "kind": "eval", "flags": [*ev, "--num-layers", "10", "--pipeline-model-parallel-size",
                                                        "3", "--decoder-first-pipeline-num-layers", "2", "--load", f"{d}/g"]},
    ]
    (d / "cases.json").write_text(json.dumps(cases))
    torchrun([str(d / "cases.json"), str(d / "results.jsonl")], nproc=3, timeout=900,
             script=str(ROOT / "tests" / "workers" / "vpp_worker.py"))
    return {r["name"]: r for r in map(json.loads, (d / "results.jsonl").read_text().splitlines())}


def _close(a: dict, b: dict, iters) -> None:
    for i in iters:
        assert a[str(i)] == pytest.approx(b[str(i)], rel=TOL, abs=TOL), (i, a, b)


def _counts(rank_layers) -> list:
    return [len(x) for x in rank_layers]


def test_uneven_training_matches_pp1(runs):
    assert _counts(runs["first1"]["rank_layers"]) == [1, 2, 2]
    _close(runs["first1"]["losses"], runs["pp1"]["losses"], range(1, 5))
    assert len(set(runs["pp1"]["losses"].values())) == 4  # the model trains (the losses move)
    # embedding and loss counted: (4 + 2) / 3 = 2 slots per stage -> 1 | 2 | 1 layers
    assert _counts(runs["emb_loss"]["rank_layers"]) == [1, 2, 1]
    _close(runs["emb_loss"]["losses"], runs["pp1_4"]["losses"], range(1, 5))
    # interleaved over uneven stages: 2 | 4 | 2 layers, two chunks each
    vp8 = runs["vp8"]
    assert (vp8["layout"], vp8["chunks"], _counts(vp8["rank_layers"])) == ("TP1 PP3 VP2 DP1", 2, [2, 4, 2])
    assert vp8["rank_layers"][0] == [0, 4]  # megatron's interleaving: chunk 0 then chunk 1 of the model
    _close(vp8["losses"], runs["pp1_8"]["losses"], range(1, 5))


def test_resume_from_uneven_at_pp1(runs):
    _close(runs["resume_pp1"]["losses"], runs["pp1"]["losses"], (3, 4))


def test_depth_growth_at_uneven_layouts(runs):
    ref = runs["grow_pp1"]
    for name, final in (("grow_first1", [1, 4, 4]), ("grow_to_last1", [4, 4, 1])):
        r = runs[name]
        (stage,) = r["stages"]
        assert stage["after"] == pytest.approx(stage["before"], abs=TOL)  # identity growth keeps the function
        assert stage["after"] == pytest.approx(ref["stages"][0]["after"], abs=TOL)
        assert _counts(r["final_rank_layers"]) == final
        _close(r["losses"], ref["losses"], range(1, 5))  # and trains on exactly as the grown PP1 model


def test_convert_and_offline_grow_into_uneven_layouts(runs):
    e = runs["e_src"]["eval"]
    assert _counts(runs["e_c_last1"]["rank_layers"]) == [2, 2, 1]
    assert runs["e_c_last1"]["eval"] == pytest.approx(e, abs=TOL)
    assert _counts(runs["e_g_first2"]["rank_layers"]) == [2, 4, 4]
    assert runs["e_g_first2"]["eval"] == pytest.approx(e, abs=TOL)  # identity growth, 5 -> 10 layers
