"""Property tests (hypothesis): growth preserves the function for random small shapes of both families.

In one process, without megatron-core: a random HuggingFace model of a random small shape (layers,
heads, query groups, head size, FFN, vocabulary) is mapped to megatron's global checkpoint tensors
(``hf_to_megatron``), grown whole by the engine's one-tensor path (``growth.engine.grown_global``:
the operators' maths applied to the whole region, which ``tests/test_growth.py`` checks equal to
every shard's region and ``tests/test_oracle.py`` checks against the paper's equations), mapped back, and the grown model's logits must equal the source model's. The oracle is the
independent HF forward pass. Few examples, no deadline: a few seconds per example on a loaded CPU.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def growth_cases(draw):
    family = draw(st.sampled_from(["gpt2", "llama"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    groups = heads if family == "gpt2" else draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    head_dim = draw(st.sampled_from([4, 8]))
    ffn = draw(st.integers(2, 6)) * 8
    layers = draw(st.integers(1, 3))
    depth = draw(st.sampled_from([None, 2, "map"]))
    width = draw(st.sampled_from([1, 2]) if depth else st.just(2))
    depth_map = None
    if depth == "map":  # an explicit --depth-map keeping every layer in order, with copies and fresh ('new') layers
        depth, depth_map = None, list(range(layers))
        for _ in range(draw(st.integers(1, layers + 1))):
            at = draw(st.integers(0, len(depth_map)))
            before = {i for i in depth_map[:at] if i is not None}
            depth_map.insert(at, draw(st.sampled_from([None, *sorted(before)])))
    return dict(family=family, heads=heads, groups=groups, head_dim=head_dim, ffn=ffn, layers=layers,
                vocab=draw(st.integers(17, 60)), depth_factor=depth, depth_map=depth_map, width_factor=width,
                placement=draw(st.sampled_from(["interleave", "stack"])),
                width_split=draw(st.sampled_from([0.5, 0.6, 0.3])), seed=draw(st.integers(0, 2**16)))


def _config(c):
    from megatron_staged.config import Config, pad_vocab_size, resolve_model

    cfg = Config()
    m = cfg.model
    m.model_family, m.num_layers, m.num_attention_heads = c["family"], c["layers"], c["heads"]
    m.hidden_size, m.kv_channels, m.ffn_hidden_size = c["heads"] * c["head_dim"], c["head_dim"], c["ffn"]
    m.seq_length = 16
    if c["groups"] != c["heads"]:
        m.group_query_attention, m.num_query_groups = True, c["groups"]
    m.make_vocab_size_divisible_by = 16
    m.vocab_size = c["vocab"]
    resolve_model(m)
    m.padded_vocab_size = pad_vocab_size(c["vocab"], 16, 1)
    return cfg


def _hf_model(arch, state=None, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from megatron_staged.checkpoint.hf_mapping import GPT2, hf_config_dict

    kw = hf_config_dict(arch)
    kw.pop("model_type")
    gpt2 = arch.hf_class == GPT2
    torch.manual_seed(seed)
    model = (GPT2LMHeadModel if gpt2 else LlamaForCausalLM)((GPT2Config if gpt2 else LlamaConfig)(**kw)).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all(k == "lm_head.weight" and arch.tied or k.endswith(".attn.bias") for k in missing), missing
    else:  # make every tensor non-trivial (HF zero-initialises biases and sets norms to one)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(growth_cases())
@example(dict(family="llama", heads=4, groups=2, head_dim=4, ffn=16, layers=2, vocab=33, depth_factor=None,
              depth_map=[0, None, 1, None], width_factor=2, placement="interleave", width_split=0.5, seed=3))
def test_growth_preserves_the_function(c):
    from megatron_staged.checkpoint.hf_mapping import arch_from_model_config, hf_to_megatron, megatron_to_hf
    from megatron_staged.growth.engine import grown_global
    from megatron_staged.growth.spec import GrowthRequest, make_spec, target_config

    old_cfg = _config(c)
    old_arch = arch_from_model_config(old_cfg.model, c["vocab"])
    small = _hf_model(old_arch, seed=c["seed"])
    hf_sd = small.state_dict()
    src = hf_to_megatron(hf_sd.__getitem__, old_arch)
    request = GrowthRequest(depth_factor=c["depth_factor"], depth_placement=c["placement"],
                            depth_map=",".join("new" if i is None else str(i) for i in c["depth_map"]) if c["depth_map"] else None,
                            width_factor=c["width_factor"], width_split=c["width_split"])
    spec = make_spec(old_cfg, request)
    new_cfg = target_config(old_cfg, spec, 1)
    grown = {}
    for key, t in src.items():
        def fetch(kind, mkey, layer, _t=t):
            return _t if layer is None else _t[layer]
        if key.startswith("decoder.layers."):
            layers = [grown_global(key, "param", j, spec, old_cfg.model, fetch) for j in range(spec.new_num_layers)]
            shape = next(x.shape for x in layers if x is not None)
            assert all(x is not None for x, src in zip(layers, spec.depth_map) if src is not None)
            # a fresh layer's own init (random); identity zeroed its residual outputs already
            gen = torch.Generator().manual_seed(c["seed"])
            grown[key] = torch.stack([x if x is not None else 0.1 * torch.randn(shape, generator=gen)
                                      for x in layers])
        else:
            grown[key] = grown_global(key, "param", -1, spec, old_cfg.model, fetch)
    assert all(v is not None for v in grown.values()), [k for k, v in grown.items() if v is None]
    new_arch = arch_from_model_config(new_cfg.model, c["vocab"])
    big = _hf_model(new_arch, megatron_to_hf(grown, new_arch))
    assert new_arch.num_layers == (len(c["depth_map"]) if c["depth_map"] else c["layers"] * (c["depth_factor"] or 1))
    assert new_arch.hidden == old_arch.hidden * c["width_factor"]
    tokens = torch.randint(0, c["vocab"], (2, 12), generator=torch.Generator().manual_seed(c["seed"]))
    with torch.no_grad():
        a, b = small(tokens).logits, big(tokens).logits
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"{c}: max |diff| {float((a - b).abs().max()):.3g}"


# ---- convert round-trips and resume is exact: random layouts, one torchrun job for all examples -----
#
# Megatron-core costs ~7 s to import per process, so the examples are drawn here (hypothesis,
# derandomized, no database: the same examples on every run) and run by ONE torchrun launch of
# tests/workers/property_worker.py with 4 processes; every layout TP x PP x DP = 4 is drawn.
# What is exact, and so asserted bit for bit:
#   * convert A -> B -> A reproduces every tensor (weights and Adam moments) and common.pt's state,
#     and A -> B already holds the same global tensors (moments are saved in model space);
#   * resuming at the same layout reproduces the uninterrupted run's losses.
# What is not exact and so compared to 1e-5 relative: the eval loss at B vs A, and a resume at
# another layout with the same DP: at a fixed world of 4 that is another TP (a row-parallel matmul
# sums its partial products in another order). DP is kept because the gradient all-reduce over
# another number of replicas sums in another order too (and the data order per replica changes).

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, read_records, torchrun  # noqa: E402

LAYOUTS4 = [(1, 1, 4), (2, 1, 2), (1, 2, 2), (4, 1, 1), (2, 2, 1), (1, 4, 1)]


@st.composite
def layout_cases(draw, kind):
    a = draw(st.sampled_from(LAYOUTS4))
    others = [lay for lay in LAYOUTS4 if lay != a and (kind == "convert" or lay[2] == a[2])]
    b = draw(st.sampled_from(others)) if others else a  # DP 4 has one layout: resumed where it was saved
    tp, pp = max(a[0], b[0]), max(a[1], b[1])  # every count below divides by both layouts' sizes
    family = draw(st.sampled_from(["gpt2", "llama"]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if h % tp == 0]))
    groups = heads if family == "gpt2" else draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0 and g % tp == 0]))
    iters = draw(st.integers(2, 4))
    return dict(kind=kind, a=a, b=b, family=family, heads=heads, groups=groups,
                head_dim=draw(st.sampled_from([4, 8])), ffn=draw(st.integers(1, 4)) * 8,
                layers=draw(st.sampled_from([n for n in (1, 2, 4) if n % pp == 0])),
                vocab=draw(st.integers(17, 80)), seed=draw(st.integers(1, 9999)), iters=iters,
                k=draw(st.integers(1, iters - 1)))


def draw_examples(strategy, n: int, explicit=()) -> list[dict]:
    """The ``explicit`` cases and ``n`` drawn examples of ``strategy``, the same on every run
    (derandomized, no example database)."""
    out = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case):
        out.append(case)

    for case in explicit:
        collect = example(case)(collect)
    collect()
    return out


N_CONVERT, N_RESUME = 4, 4


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """Every example of both properties, run by one 4-process torchrun job."""
    d = tmp_path_factory.mktemp("props")
    cases = []
    for kind, n in (("convert", N_CONVERT), ("resume", N_RESUME)):
        for i, c in enumerate(draw_examples(layout_cases(kind), n)):
            cases.append(dict(c, name=f"{kind}{i}", dir=str(d / f"{kind}{i}")))
    (d / "cases.json").write_text(json.dumps(cases))
    torchrun([str(d / "cases.json"), str(d / "results.jsonl")], nproc=4, timeout=1800,
             script=str(ROOT / "tests" / "workers" / "property_worker.py"))
    results = {r["name"]: r for r in read_records(d / "results.jsonl")}
    return [(c, results[c["name"]]) for c in cases]


def _iter_dir(root):
    from pathlib import Path

    root = Path(root)
    return root / f"iter_{int((root / 'latest_checkpointed_iteration.txt').read_text()):07d}"


def _losses(path):
    return {r["iteration"]: r["loss"] for r in read_records(path) if "loss" in r}


def _label(c):
    return (f"{c['family']} L{c['layers']} heads {c['heads']}/{c['groups']} x{c['head_dim']} ffn {c['ffn']} "
            f"vocab {c['vocab']}: TP{c['a'][0]} PP{c['a'][1]} DP{c['a'][2]} -> TP{c['b'][0]} PP{c['b'][1]} DP{c['b'][2]}")


def test_convert_round_trips_bitwise_at_random_layouts(layout_runs):
    from megatron_staged.checkpoint.global_tensors import read_common, read_global_tensors

    runs = [(c, r) for c, r in layout_runs if c["kind"] == "convert"]
    assert len(runs) == N_CONVERT and {c["family"] for c, _ in runs} == {"gpt2", "llama"}
    for c, r in runs:
        a, b, aa = (_iter_dir(os.path.join(c["dir"], x)) for x in ("a", "b", "aa"))
        ta, tb, taa = (read_global_tensors(str(x)) for x in (a, b, aa))
        assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in ta), "Adam moments are saved"
        for name, other in (("A->B", tb), ("A->B->A", taa)):
            assert sorted(other) == sorted(ta), f"{_label(c)}: {name} changed the set of tensors"
            differ = [k for k in ta if ta[k].dtype != other[k].dtype or not torch.equal(ta[k], other[k])]
            assert not differ, f"{_label(c)}: {name} changed {differ}"
        ca, caa = read_common(str(a)), read_common(str(aa))
        for key in ("iteration", "train_state", "opt_param_scheduler", "optimizer", "args", "parallel_layout"):
            assert ca[key] == caa[key], f"{_label(c)}: common.pt {key} changed by A->B->A"
        assert ca["iteration"] == c["iters"]
        assert r["eval_b"] == pytest.approx(r["eval_a"], rel=1e-5), _label(c)


def test_resume_is_exact_at_random_iterations_and_layouts(layout_runs):
    runs = [(c, r) for c, r in layout_runs if c["kind"] == "resume"]
    assert len(runs) == N_RESUME and {c["family"] for c, _ in runs} == {"gpt2", "llama"}
    for c, _ in runs:
        d, k, n = c["dir"], c["k"], c["iters"]
        ref = _losses(os.path.join(d, "straight.jsonl"))
        assert sorted(ref) == list(range(1, n + 1))
        for name in ("same", "other"):
            got = _losses(os.path.join(d, f"resumed_{name}.jsonl"))
            assert sorted(got) == list(range(k + 1, n + 1)), f"{_label(c)}: resumed {name} at {k}"
            want = {i: ref[i] for i in got}
            if c["a"] == c["b"] or name == "same":  # bit for bit
                assert got == want, f"{_label(c)}: interrupted at {k}, resumed at the {name} layout: {got} != {want}"
            else:
                assert got == pytest.approx(want, rel=1e-5), f"{_label(c)}: interrupted at {k}, resumed at another TP"
