"""Growth operators on sharded training state (REFERENCE.md sections 1 and 3).

Properties: loss preserved by identity-depth, width and depth+width growth for both families at
source layouts TP{1,2} x PP{1,2} x DP{1,2} (also when the growth changes the layout); the grown
state equals the independent oracle (tests/oracle.py) on the gathered model whatever the layouts;
in-run growth from the live shards and offline growth from the checkpoint give identical tensors
with TP, PP and DP all changing, and each rank reads or receives only its target shards' source
boxes; any region of a grown tensor is the slice of the whole; moments follow the rules; training continues and
its loss falls; duplicated width units diverge; bad requests fail before anything is written.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import ROOT, TINY_GPT2, TINY_LLAMA, read_records, run_cli, torchrun

import oracle as O
from megatron_staged.config import Config
from megatron_staged.growth.spec import GrowthRequest, depth_map_for, make_spec, parse_depth_map

read_checkpoint_tensors = O.read_tensors

TOL = 1e-5

# Source layouts by world size: (tp, pp) pairs; DP = world / (tp * pp).
WORLDS = {1: [(1, 1)], 2: [(1, 1), (2, 1), (1, 2)], 4: [(2, 1), (1, 2), (2, 2)], 8: [(2, 2)]}
OPS = [
    ("depth", {"depth_factor": 2}),
    ("width", {"width_factor": 2}),
    ("depth+width", {"depth_factor": 2, "width_factor": 2}),
]


def _target(op, tp, pp, world):
    """A target layout that changes the layout where the grown model allows it."""
    stage = {}
    if "depth" in op and pp == 1 and world % (2 * tp) == 0:
        stage["target_pipeline_model_parallel_size"] = 2  # depth growth adds pipeline stages
    elif "width" in op and tp == 1 and world % (2 * pp) == 0:
        stage["target_tensor_model_parallel_size"] = 2  # width growth re-partitions TP shards
    return stage


@pytest.fixture(scope="session")
def sources(tmp_path_factory, corpus):
    """A 3-iteration source checkpoint per family (non-trivial Adam moments), TP1 PP1 DP2; the llama
    with per-head query/key norms (--qk-layernorm, as Qwen3)."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for family, flags in (("gpt2", TINY_GPT2), ("llama", [*TINY_LLAMA, "--qk-layernorm"])):
        flags = [f for f in flags]
        i = flags.index("--num-layers")
        flags[i + 1] = "2"
        torchrun(["train", *flags, *corpus, "--train-iters", "3", "--use-distributed-optimizer",
                  "--save", str(root / family)], nproc=2)
        out[family] = str(root / family)
    return out


@pytest.fixture(scope="session")
def grown(tmp_path_factory, sources, corpus):
    """Run every (family, source layout, op) case through the in-run growth path."""
    root = tmp_path_factory.mktemp("grown")
    results = {}
    n = 0
    for world, layouts in WORLDS.items():
        cases = []
        for tp, pp in layouts:
            for family in ("gpt2", "llama"):
                op, stage = OPS[n % len(OPS)]
                n += 1
                stage = dict(stage, **_target(op, tp, pp, world))
                name = f"{family}_w{world}_tp{tp}pp{pp}_{op}"
                cases.append({"name": name, "source": sources[family], "tp": tp, "pp": pp,
                              "stage": stage, "out": str(root / name), "data": corpus, "family": family,
                              "op": op})
        spec_file = root / f"cases_{world}.json"
        spec_file.write_text(json.dumps(cases))
        res_file = root / f"results_{world}.jsonl"
        torchrun([str(spec_file), str(res_file)], nproc=world, script=str(ROOT / "tests/workers/growth_worker.py"),
                 timeout=900)
        for r in read_records(res_file):
            case = next(c for c in cases if c["name"] == r["name"])
            results[r["name"]] = dict(case, **r)
    return results


def test_growth_preserves_loss_at_every_layout(grown):
    seen = set()
    for name, r in grown.items():
        assert abs(r["after"] - r["before"]) <= TOL, f"{name}: {r['before']} -> {r['after']}"
        seen.add((r["family"], r["op"]))
        changed = (r["from"]["tp"], r["from"]["pp"]) != (r["to"]["tp"], r["to"]["pp"])
        seen.add(("layout-change", r["op"])) if changed else None
    for family in ("gpt2", "llama"):
        for op, _ in OPS:
            assert (family, op) in seen, f"no {family} {op} case ran"
    assert ("layout-change", "depth") in seen and ("layout-change", "width") in seen


def test_grown_state_equals_oracle_at_every_layout(grown, sources):
    """Whatever the source/target layouts, the grown checkpoint == the independent oracle
    (tests/oracle.py) applied to the gathered source: 2 -> 4 layers interleave identity, width x2."""
    src_tensors = {f: read_checkpoint_tensors(os.path.join(p, "iter_0000003")) for f, p in sources.items()}
    for name, r in grown.items():
        got = read_checkpoint_tensors(os.path.join(r["out"], "iter_0000003"))
        a = O.describe(O.read_common(os.path.join(r["source"], "iter_0000003")))
        depth = "depth" in r["op"]
        dmap = [0, 0, 1, 1] if depth else [0, 1]  # interleave: old i -> new 2i, 2i+1
        ref = O.stacked(O.grow_state(src_tensors[r["family"]], a, depth_map=dmap, width="width" in r["op"]))
        compared = 0
        for key, want in ref.items():
            assert key in got, f"{name}: grown checkpoint lacks {key}"
            assert got[key].shape == want.shape, f"{name}: {key} {tuple(got[key].shape)} != {tuple(want.shape)}"
            torch.testing.assert_close(got[key].float(), want.float(), rtol=0, atol=0, msg=f"{name}: {key}")
            compared += 1
        assert compared > 20, f"{name}: only {compared} tensors compared"
        assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in ref), "moments were not compared"


def test_moments_follow_the_rules(grown, sources):
    """Checked against the source directly (not through the operator code)."""
    width = next(r for r in grown.values() if r["op"] == "width" and r["family"] == "llama")
    depth = next(r for r in grown.values() if r["op"] == "depth" and r["family"] == "gpt2")
    # width x2 on llama (untied output, SwiGLU, GQA)
    s = read_checkpoint_tensors(os.path.join(sources["llama"], "iter_0000003"))
    g = read_checkpoint_tensors(os.path.join(width["out"], "iter_0000003"))
    for kind, scale in (("exp_avg", 0.5), ("exp_avg_sq", 0.25)):
        k = f"optimizer.state.{kind}.decoder.layers.mlp.linear_fc2.weight"
        h, f = s[k].shape[1], s[k].shape[2]
        torch.testing.assert_close(g[k][:, :h, :f], s[k] * scale, rtol=0, atol=0)
        torch.testing.assert_close(g[k][:, h:, f:], s[k] * scale, rtol=0, atol=0)
        assert g[k][:, :h, f:].abs().max() == 0 and g[k][:, h:, :f].abs().max() == 0, "new zero blocks: zero moments"
        out = f"optimizer.state.{kind}.output_layer.weight"  # carries the split: full gradient, unscaled
        torch.testing.assert_close(g[out], torch.cat([s[out], s[out]], dim=1), rtol=0, atol=0)
    # the split output layer itself: [alpha W, (1-alpha) W]
    w, gw = s["output_layer.weight"], g["output_layer.weight"]
    torch.testing.assert_close(gw[:, : w.shape[1]] + gw[:, w.shape[1]:], w, rtol=1e-6, atol=1e-7)
    # depth x2 interleave with identity init on gpt2: new layers 2i+1
    s = read_checkpoint_tensors(os.path.join(sources["gpt2"], "iter_0000003"))
    g = read_checkpoint_tensors(os.path.join(depth["out"], "iter_0000003"))
    for kind in ("exp_avg", "exp_avg_sq"):
        for name in ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight",
                     "self_attention.linear_qkv.layer_norm_weight"):  # input_layernorm's checkpoint key
            k = f"optimizer.state.{kind}.decoder.layers.{name}"
            for i in range(s[k].shape[0]):
                torch.testing.assert_close(g[k][2 * i], s[k][i], rtol=0, atol=0)
                torch.testing.assert_close(g[k][2 * i + 1], s[k][i], rtol=0, atol=0)
        for name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"):
            k = f"optimizer.state.{kind}.decoder.layers.{name}"
            assert g[k][1::2].abs().max() == 0, f"identity-zeroed {name}: zero moments"
            torch.testing.assert_close(g[k][0::2], s[k], rtol=0, atol=0)
    assert g["decoder.layers.mlp.linear_fc2.weight"][1::2].abs().max() == 0


@pytest.fixture(scope="session")
def staged_run(tmp_path_factory, corpus):
    """A gpt2 run growing in-run at iteration 3 (depth x2 + width x2, TP1 -> TP2), then 4 more steps."""
    root = tmp_path_factory.mktemp("staged")
    cfg = root / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 3, depth_factor: 2, width_factor: 2, "
                   "target_tensor_model_parallel_size: 2, rewarmup_iters: 2}\n")
    flags = list(TINY_GPT2)
    flags[flags.index("--num-layers") + 1] = "2"
    log = root / "log.jsonl"
    torchrun(["train", "--config", str(cfg), *flags, *corpus, "--train-iters", "9", "--use-distributed-optimizer",
              "--save", str(root / "ckpt"), "--save-interval", "3", "--log-file", str(log), "--lr", "3e-3"], nproc=2)
    return root


# Live (in-run) growth with a layout change, then the same growth of the same state offline, in one
# 4-process job: (family, source TP, source PP, stage).
LIVE_CASES = [
    ("gpt2", 2, 2, {"depth_factor": 2, "width_factor": 2, "target_tensor_model_parallel_size": 1,
                    "target_pipeline_model_parallel_size": 4}),                       # TP2 PP2 -> TP1 PP4
    ("llama", 2, 2, {"depth_factor": 2, "width_factor": 2, "target_tensor_model_parallel_size": 1}),  # -> TP1 PP2 DP2
    ("llama", 1, 2, {"depth_factor": 2, "width_factor": 2, "target_tensor_model_parallel_size": 2}),  # DP2 -> TP2 PP2
]


@pytest.fixture(scope="session")
def live_and_offline(tmp_path_factory, sources, corpus):
    root = tmp_path_factory.mktemp("live")
    cases = []
    for n, (family, tp, pp, stage) in enumerate(LIVE_CASES):
        name = f"{family}_tp{tp}pp{pp}_{n}"
        cases.append({"name": name, "source": sources[family], "tp": tp, "pp": pp, "stage": stage, "data": corpus,
                      "family": family, "out": str(root / name / "live"), "offline_out": str(root / name / "offline")})
    (root / "cases.json").write_text(json.dumps(cases))
    torchrun([str(root / "cases.json"), str(root / "results.jsonl")], nproc=4,
             script=str(ROOT / "tests/workers/growth_worker.py"), timeout=900)
    return {r["name"]: dict(next(c for c in cases if c["name"] == r["name"]), **r)
            for r in read_records(root / "results.jsonl")}


def test_live_growth_equals_offline_growth(live_and_offline):
    """In-run growth from the live shards == offline growth of the same state from its checkpoint,
    bit for bit (weights, fp32 masters, moments), with TP/PP/DP all changing."""
    assert len(live_and_offline) == len(LIVE_CASES)
    for name, r in live_and_offline.items():
        assert abs(r["after"] - r["before"]) <= TOL, f"{name}: {r['before']} -> {r['after']}"
        assert (r["from"]["tp"], r["from"]["pp"]) != (r["to"]["tp"], r["to"]["pp"]), name
        live = read_checkpoint_tensors(os.path.join(r["out"], "iter_0000003"))
        offline = read_checkpoint_tensors(os.path.join(r["offline_out"], "iter_0000003"))
        keys = [k for k in offline if k.startswith(("embedding", "decoder", "output_layer", "optimizer.state"))]
        assert len(keys) > 20 and any("exp_avg_sq" in k for k in keys) and set(keys) <= set(live)
        for k in keys:
            torch.testing.assert_close(live[k], offline[k], rtol=0, atol=0, msg=f"{name}: {k}")


def _whole_source_layers_bytes(source: str, pp_rank: int, target_pp: int, new_layers: int) -> int:
    """Bytes a rank would read if it read whole source layers (fp32 master and both moments) for
    its target layers, plus every non-layer tensor: what the first engine read."""
    meta = read_checkpoint_tensors(os.path.join(source, "iter_0000003"))
    per = new_layers // target_pp
    src_layers = {j // 2 for j in range(pp_rank * per, (pp_rank + 1) * per)}  # interleave x2
    total = 0
    for k, t in meta.items():
        if not k.startswith(("optimizer.state.param.", "optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.")):
            continue
        if ".decoder.layers." in k:
            total += len(src_layers) * t[0].numel() * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def test_each_rank_moves_only_its_target_shards_share(live_and_offline):
    """Each rank receives (live) or reads (checkpoint) the source boxes its own target shards need:
    both sources deliver the same bytes, well under the rank's target shard, and where the target
    splits layers over TP ranks, about half of what reading whole source layers takes."""
    for name, r in live_and_offline.items():
        live = {s["rank"]: s for s in r["live_stats"]}
        offline = {s["rank"]: s for s in r["offline_stats"]}
        assert sorted(live) == sorted(offline) == [0, 1, 2, 3]
        for rank, s in live.items():
            got = s["bytes_moved"] + s["bytes_local"]
            assert got == offline[rank]["bytes_moved"], f"{name} rank {rank}: live {got} != checkpoint"
            assert 0 < got <= s["target_bytes"] / 2, f"{name} rank {rank}: {got} B for a {s['target_bytes']} B shard"
            if r["to"]["tp"] == 2:
                whole = _whole_source_layers_bytes(r["source"], s["pp_rank"], r["to"]["pp"], r["to"]["num_layers"])
                assert got <= 0.6 * whole, f"{name} rank {rank}: {got} B, whole source layers {whole} B"
        moved = sum(s["bytes_moved"] for s in live.values())
        sent = sum(s["bytes_sent"] for s in live.values())
        assert moved == sent, f"{name}: received {moved} B, sent {sent} B"
        # a rank that holds what its target shard needs copies it locally (TP1 DP2 -> TP2 DP1 holds it
        # all); a layout whose target shards lie on other ranks moves data
        if (r["from"]["tp"], r["from"]["pp"]) == (2, 2) and r["to"]["pp"] == 4:
            assert moved > 0, f"{name}: nothing moved between ranks"


def test_live_growth_releases_the_source(live_and_offline):
    """After an in-run growth no reference keeps the source model (with its grad buffer) or its
    optimizer (with its moments) alive on any rank: the growth's memory is the grown state's."""
    for name, r in live_and_offline.items():
        freed = [s["source_freed"] for s in r["live_stats"]]
        assert freed == [True] * 4, f"{name}: source freed per rank {freed}"


def test_flat_range_boxes_cover_the_range_in_order():
    """A distributed optimizer's shard (a flat range of a parameter) as contiguous boxes: their
    elements, in order, are exactly the range, for every range of 1- to 4-d shapes."""
    from megatron_staged.growth.sources import flat_range_boxes

    for shape in [(7,), (3, 5), (4, 3, 5), (2, 3, 2, 3)]:
        n = 1
        for d in shape:
            n *= d
        t = torch.arange(n).reshape(shape)
        for a in range(n + 1):
            for b in range(a, n + 1):
                boxes = flat_range_boxes(shape, a, b)
                got = [t[tuple(slice(lo, hi) for lo, hi in box)].reshape(-1) for box, _ in boxes]
                assert torch.equal(torch.cat(got) if got else torch.empty(0, dtype=torch.long),
                                   torch.arange(a, b)), (shape, a, b)
                assert all(int(g[0]) == at for g, (_, at) in zip(got, boxes))
                assert len(boxes) <= 2 * len(shape) - 1


def test_training_continues_after_growth_and_units_diverge(staged_run):
    recs = read_records(staged_run / "log.jsonl")
    ev = [r for r in recs if r.get("event") == "growth"]
    assert len(ev) == 1 and abs(ev[0]["eval_loss_after"] - ev[0]["eval_loss_before"]) <= TOL
    loss = {r["iteration"]: r["loss"] for r in recs if "loss" in r}
    assert sorted(loss) == list(range(1, 10))
    assert loss[9] < loss[4], f"loss did not fall after growth: {loss}"
    sizes = {r["iteration"]: r["hidden_size"] for r in recs if "loss" in r}
    assert sizes[3] == 64 and sizes[4] == 128
    # the two copies of the doubled FFN diverge (alpha split breaks the symmetry; dropout is 0)
    final = read_checkpoint_tensors(str(staged_run / "ckpt" / "iter_0000009"))
    w = final["decoder.layers.mlp.linear_fc1.weight"]  # [L, 2f, 2h]
    f, h = w.shape[1] // 2, w.shape[2] // 2
    a, b = w[:, :f, :h], w[:, f:, h:]
    rel = float((a - b).norm() / a.norm())
    assert rel > 1e-3, f"duplicated units did not diverge (relative difference {rel:.2e})"


def test_symmetric_split_keeps_copies_identical(tmp_path, corpus):
    """Control for the divergence test: alpha = 1/2 and no noise keeps the copies (nearly) equal."""
    cfg = tmp_path / "stages.yaml"
    cfg.write_text("staging:\n  stages:\n    - {at_iteration: 2, width_factor: 2, width_split: 0.5, rewarmup_iters: 2}\n")
    flags = list(TINY_GPT2)
    flags[flags.index("--num-layers") + 1] = "1"
    torchrun(["train", "--config", str(cfg), *flags, *corpus, "--train-iters", "8", "--lr", "3e-3",
              "--save", str(tmp_path / "ckpt")], nproc=1)
    final = read_checkpoint_tensors(str(tmp_path / "ckpt" / "iter_0000008"))
    w = final["decoder.layers.mlp.linear_fc1.weight"]
    f, h = w.shape[1] // 2, w.shape[2] // 2
    rel = float((w[:, :f, :h] - w[:, f:, h:]).norm() / w[:, :f, :h].norm())
    assert rel < 1e-4, f"symmetric copies drifted apart ({rel:.2e})"


def test_bad_growth_requests_fail_before_writing(tmp_path, sources):
    cases = [
        (["--width-factor", "2", "--target-tensor-model-parallel-size", "3"], "not divisible by --tensor-model-parallel-size 3"),
        (["--depth-map", "0,1,5"], "refers to layer 5"),
        (["--num-layers", "1"], "must not be shallower"),
        (["--depth-factor", "2", "--depth-placement", "middle"], "middle"),
    ]
    for i, (args, needle) in enumerate(cases):
        dst = tmp_path / f"dst{i}"
        r = run_cli(["grow", "--load", sources["gpt2"], "--save", str(dst), *args], timeout=300, check=False)
        err = r.stderr
        if needle == "middle":  # middle placement of 2 -> 4 layers is valid: copies the whole 2-layer block
            assert r.returncode == 0, err[-2000:]
            continue
        assert r.returncode == 2 and "Traceback" not in err, err[-3000:]
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], err[-3000:]
        assert not dst.exists(), "nothing may be written for a bad request"


def test_depth_maps():
    assert depth_map_for(2, 4, "interleave") == [0, 0, 1, 1]
    assert depth_map_for(2, 4, "stack") == [0, 1, 0, 1]
    assert depth_map_for(4, 6, "middle") == [0, 1, 2, 1, 2, 3]
    assert depth_map_for(3, 5, "interleave") == [0, 0, 1, 1, 2]
    assert depth_map_for(0, 3, "stack") == [None, None, None]
    assert parse_depth_map("0,0,1,new", 2) == [0, 0, 1, None]
    cfg = Config()
    cfg.model.num_layers = 2
    spec = make_spec(cfg, GrowthRequest(depth_map="0,1,0,1", depth_init="identity"))
    assert spec.new_layer == [False, False, True, True]
    assert spec.effective_rho() == pytest.approx(1.4)
    spec = make_spec(cfg, GrowthRequest(depth_factor=2, width_factor=2))
    assert spec.effective_rho() == pytest.approx(1.4 * 1.8)


def test_a_region_of_a_grown_tensor_is_the_slice_of_the_whole_and_reads_its_rows_only():
    """Growing any rectangular region (a target shard) gives exactly that slice of the whole grown
    tensor, and reads only source boxes that region needs (no process launched)."""
    import random

    from megatron_staged.growth.operators import grow_region, grow_width, grown_shape, width_pieces, width_rule

    rng = random.Random(0)
    torch.manual_seed(0)
    cases = [("decoder.layers.self_attention.linear_qkv.weight", (24, 8)), ("decoder.layers.mlp.linear_fc1.weight", (32, 8)),
             ("decoder.layers.mlp.linear_fc2.weight", (8, 16)), ("decoder.layers.mlp.linear_fc1.bias", (32,)),
             ("embedding.word_embeddings.weight", (20, 8)), ("output_layer.weight", (20, 8)),
             ("decoder.final_layernorm.weight", (8,))]
    for key, shape in cases:
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            for swiglu, tied in ((False, True), (True, False)):
                t = torch.randn(shape)
                whole = grow_width(key, kind, t, groups=2, swiglu=swiglu, tied=tied, alpha=0.6)
                rule = width_rule(key, kind, t.dim(), swiglu=swiglu, tied=tied, alpha=0.6)
                assert grown_shape(rule, shape) == tuple(whole.shape)
                for _ in range(4):
                    region = []
                    for n in whole.shape:
                        lo = rng.randrange(n)
                        region.append((lo, rng.randrange(lo + 1, n + 1)))
                    got = grow_region(key, kind, rule, shape, tuple(region),
                                      lambda box: t[tuple(slice(a, b) for a, b in box)])
                    torch.testing.assert_close(got, whole[tuple(slice(a, b) for a, b in region)], rtol=0, atol=0)
    # a shard holding rows 0..h-1 of a doubled fc2 [2h, 2f]: reads the source once (the diagonal
    # block); its other block is new (zero)
    rule = width_rule("decoder.layers.mlp.linear_fc2.weight", "param", 2, swiglu=False, tied=True, alpha=0.6)
    pieces = width_pieces(rule, (8, 16), ((0, 8), (0, 32)))
    read = [p.source for p in pieces if p.source is not None]
    assert read == [((0, 8), (0, 16))] and sum(p.source is None for p in pieces) == 1
    # a shard holding rows 0..h/2-1 reads half the source rows
    read = [p.source for p in width_pieces(rule, (8, 16), ((0, 4), (0, 32))) if p.source is not None]
    assert read == [((0, 4), (0, 16))]
