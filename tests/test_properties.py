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
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def growth_cases(draw):
    family = draw(st.sampled_from(["gpt2", "llama"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    groups = heads if family == "gpt2" else draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    head_dim = draw(st.sampled_from([4, 8]))
    ffn = draw(st.integers(2, 6)) * 8
    layers = draw(st.integers(1, 3))
    depth = draw(st.sampled_from([None, 2]))
    width = draw(st.sampled_from([1, 2]) if depth else st.just(2))
    return dict(family=family, heads=heads, groups=groups, head_dim=head_dim, ffn=ffn, layers=layers,
                vocab=draw(st.integers(17, 60)), depth_factor=depth, width_factor=width,
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


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(growth_cases())
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
                            width_factor=c["width_factor"], width_split=c["width_split"])
    spec = make_spec(old_cfg, request)
    new_cfg = target_config(old_cfg, spec, 1)
    grown = {}
    for key, t in src.items():
        def fetch(kind, mkey, layer, _t=t):
            return _t if layer is None else _t[layer]
        if key.startswith("decoder.layers."):
            grown[key] = torch.stack([grown_global(key, "param", j, spec, old_cfg.model, fetch)
                                      for j in range(spec.new_num_layers)])
        else:
            grown[key] = grown_global(key, "param", -1, spec, old_cfg.model, fetch)
    assert all(v is not None for v in grown.values()), [k for k, v in grown.items() if v is None]
    new_arch = arch_from_model_config(new_cfg.model, c["vocab"])
    big = _hf_model(new_arch, megatron_to_hf(grown, new_arch))
    assert new_arch.num_layers == c["layers"] * (c["depth_factor"] or 1)
    assert new_arch.hidden == old_arch.hidden * c["width_factor"]
    tokens = torch.randint(0, c["vocab"], (2, 12), generator=torch.Generator().manual_seed(c["seed"]))
    with torch.no_grad():
        a, b = small(tokens).logits, big(tokens).logits
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"{c}: max |diff| {float((a - b).abs().max()):.3g}"
