"""import-hf / export-hf with inputs a new user brings (found exploring the HF tools as a new user).

Tiny transformers models are built from configs with random weights; nothing is downloaded. The
oracles are the files on disk (what a shard index names, what transformers' tokenizer holds, the
bytes of the source directory), not the code under test.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import run_cli  # noqa: E402

transformers = pytest.importorskip("transformers")

VOCAB = 61


def _llama(d, **save):
    import torch

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16)).save_pretrained(str(d), **save)
    return d


def _tokenizer(d, n):
    """A WordLevel tokenizer with ``n`` tokens (eos included) saved into ``d``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n - 2)}
    vocab.update({"<unk>": n - 2, "</s>": n - 1})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>").save_pretrained(str(d))


def test_missing_shard_or_truncated_weights_is_one_line_before_any_work(tmp_path):
    """Found as a new user: a sharded checkpoint with one shard not copied, or a truncated
    model.safetensors, gave a FileNotFoundError / SafetensorError traceback."""
    from megatron_staged.errors import UserError
    from megatron_staged.tools.hf_import import HFWeights

    sharded = _llama(tmp_path / "sharded", max_shard_size="4KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) >= 2
    HFWeights(str(sharded))  # complete: reads
    os.remove(sharded / shards[1])
    with pytest.raises(UserError) as e:
        HFWeights(str(sharded))
    assert shards[1] in str(e.value) and "\n" not in str(e.value)

    whole = _llama(tmp_path / "whole")
    data = (whole / "model.safetensors").read_bytes()
    (whole / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        HFWeights(str(whole)).shape("model.embed_tokens.weight")
    assert "model.safetensors cannot be read" in str(e.value) and "\n" not in str(e.value)
    r = run_cli(["import-hf", "--hf", str(whole), "--save", str(tmp_path / "ck")], check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot be read" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ck").exists()


def test_tokenizer_that_does_not_fit_or_load(tmp_path, capsys):
    """Found as a new user: import-hf recorded a tokenizer with more tokens than the model's vocab_size
    (ids beyond it have no embedding row), and recorded tokenizer files that do not load, after which
    export-hf of the checkpoint failed ('cannot load a HuggingFace tokenizer') whatever flags were given."""
    from megatron_staged.errors import UserError
    from megatron_staged.tools.hf_import import check_hf_tokenizer

    d = tmp_path / "m"
    d.mkdir()
    assert check_hf_tokenizer(str(d), VOCAB) is False  # no tokenizer: nothing recorded
    _tokenizer(d, VOCAB)
    assert len(transformers.AutoTokenizer.from_pretrained(str(d))) == VOCAB
    assert check_hf_tokenizer(str(d), VOCAB) is True
    big = tmp_path / "big"
    _tokenizer(big, VOCAB + 5)
    with pytest.raises(UserError, match=rf"has {VOCAB + 5} tokens but the model's vocab_size is {VOCAB}"):
        check_hf_tokenizer(str(big), VOCAB)
    os.remove(d / "tokenizer.json")  # tokenizer_config.json alone: transformers cannot build it
    with pytest.raises(Exception):
        transformers.AutoTokenizer.from_pretrained(str(d))
    capsys.readouterr()
    assert check_hf_tokenizer(str(d), VOCAB) is False
    assert "do not load" in capsys.readouterr().out


def test_export_into_the_imported_model_directory_is_refused(tmp_path):
    """Found as a new user: `export-hf --out HF --overwrite` where HF is the directory the checkpoint was
    imported from (and its tokenizer) rewrote HF's config.json, then died with shutil.SameFileError
    copying the tokenizer onto itself (a traceback, the source model half-replaced)."""
    from megatron_staged.errors import UserError
    from megatron_staged.tools.hf_export import export

    hf = _llama(tmp_path / "hf")
    _tokenizer(hf, VOCAB)
    run_cli(["import-hf", "--hf", str(hf), "--save", str(tmp_path / "ck")])
    before = {f: hashlib.sha256((hf / f).read_bytes()).hexdigest() for f in sorted(os.listdir(hf))}
    with pytest.raises(UserError, match="the export would overwrite it"):
        export(str(tmp_path / "ck"), str(hf), overwrite=True)
    assert {f: hashlib.sha256((hf / f).read_bytes()).hexdigest() for f in sorted(os.listdir(hf))} == before
    s = export(str(tmp_path / "ck"), str(tmp_path / "out"))  # a new directory: exported, tokenizer included
    assert s["vocab_size"] == VOCAB and (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_classifier_is_not_imported_as_a_causal_lm(tmp_path):
    """Found as a new user: a LlamaForSequenceClassification directory (tied embeddings, as Llama 3.2's)
    imported as a LlamaForCausalLM: its score head silently dropped, the output layer taken from the
    embeddings. GPT2Model (GPT-2 without the head, which GPT-2 ties to wte anyway) still imports."""
    from megatron_staged.checkpoint.hf_mapping import arch_from_hf_config
    from megatron_staged.errors import UserError

    cfg = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
               tie_word_embeddings=True, num_labels=3)
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**cfg)).save_pretrained(str(tmp_path / "cls"))
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(str(tmp_path / "lm"))
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        str(tmp_path / "gpt2"))
    read = lambda name: json.loads((tmp_path / name / "config.json").read_text())  # noqa: E731
    with pytest.raises(UserError, match="not a causal language model") as e:
        arch_from_hf_config(read("cls"))
    assert "\n" not in str(e.value)
    assert arch_from_hf_config(read("lm")).tied and arch_from_hf_config(read("gpt2")).hf_class == "GPT2LMHeadModel"


@pytest.mark.parametrize("field,value", [("vocab_size", None), ("hidden_size", "16"), ("tie_word_embeddings", "false"),
                                         ("max_position_embeddings", None), ("rms_norm_eps", "1e-5"),
                                         ("head_dim", 0), ("num_key_value_heads", 0)])
def test_config_values_transformers_rejects_are_one_line(field, value):
    """Found as a new user (hand-edited config.json): vocab_size null or max_position_embeddings null gave a
    TypeError traceback, hidden_size "16" a torch traceback, tie_word_embeddings "false" (a truthy string)
    imported the model as tied, silently ignoring its lm_head, and head_dim 0 / num_key_value_heads 0
    were read as absent (hidden/heads, MHA). transformers rejects the typed ones itself; 0 is no size."""
    from megatron_staged.checkpoint.hf_mapping import arch_from_hf_config
    from megatron_staged.errors import UserError

    base = dict(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=16,
                tie_word_embeddings=False, rms_norm_eps=1e-5)
    assert arch_from_hf_config(base).tied is False
    if value != 0:  # the oracle: transformers refuses the same value
        with pytest.raises(Exception, match=field):
            transformers.LlamaConfig(**{k: v for k, v in dict(base, **{field: value}).items() if k != "model_type"})
    with pytest.raises(UserError) as e:
        arch_from_hf_config(dict(base, **{field: value}))
    assert f"config.json {field} is {json.dumps(value)}" in str(e.value) and "\n" not in str(e.value)


def test_overwrite_never_leaves_another_tokenizer_beside_the_export(tmp_path):
    """Found as a new user: `export-hf --overwrite` of a checkpoint without a tokenizer into a directory
    holding an earlier export's tokenizer.json left it there: AutoTokenizer.from_pretrained(out) then
    loaded a tokenizer the checkpoint was never trained with. Now refused, naming the files, deleting none."""
    from megatron_staged.errors import UserError
    from megatron_staged.tools.hf_export import export

    hf = _llama(tmp_path / "hf")
    run_cli(["import-hf", "--hf", str(hf), "--save", str(tmp_path / "ck")])  # no tokenizer in hf
    out = tmp_path / "out"
    _tokenizer(out, VOCAB)  # what an earlier export (or anything else) left there
    assert transformers.AutoTokenizer.from_pretrained(str(out)) is not None  # transformers would load it
    before = sorted(os.listdir(out))
    with pytest.raises(UserError, match="tokenizer.json") as e:
        export(str(tmp_path / "ck"), str(out), overwrite=True)
    assert "\n" not in str(e.value) and sorted(os.listdir(out)) == before
    os.remove(out / "tokenizer.json")
    os.remove(out / "tokenizer_config.json")
    export(str(tmp_path / "ck"), str(out), overwrite=True)
    assert (out / "model.safetensors").is_file()
    # Found too: with no tokenizer in the checkpoint, the export's config.json lost the source's bos/eos
    # ids (null), so generate() on the exported model never stopped at EOS
    src, got = (json.loads((d / "config.json").read_text()) for d in (hf, out))
    assert src["eos_token_id"] is not None
    assert all(got[k] == src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))


def test_layout_errors_name_the_config_json_fields():
    """Found as a new user: importing a multi-query model (num_key_value_heads 1, as many small models)
    at TP2 said '--num-query-groups 1 is not divisible by ...', a flag import-hf does not have."""
    from megatron_staged.checkpoint.hf_mapping import arch_from_hf_config
    from megatron_staged.errors import UserError
    from megatron_staged.tools.hf_import import import_config, parse_args

    for mt, fields, field in (
            ("llama", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=1), "num_key_value_heads 1"),
            ("gpt2", dict(n_embd=32, n_inner=48, n_layer=3, n_head=4, n_positions=16), "n_layer 3")):
        arch = arch_from_hf_config(dict(fields, model_type=mt, vocab_size=VOCAB), padded_vocab=256)
        tp, pp = (2, 1) if mt == "llama" else (1, 2)
        args = parse_args(["--hf", "x", "--save", "y", "--target-tensor-model-parallel-size", str(tp),
                           "--target-pipeline-model-parallel-size", str(pp)])
        with pytest.raises(UserError) as e:
            import_config(arch, args, "/nonexistent", tp * pp)
        assert str(e.value).startswith(f"config.json's {field} is not divisible by --target-"), str(e.value)


def test_weights_file_is_the_one_transformers_loads(tmp_path):
    """Found as a new user: a directory holding both a sharded safetensors index and a model.safetensors
    (a re-save next to an old download) was imported from the shards, while transformers loads the
    single file: import-hf read other weights than transformers does."""
    import shutil

    import torch

    from megatron_staged.tools.hf_import import HFWeights

    d = _llama(tmp_path / "d", max_shard_size="4KB")  # shards + model.safetensors.index.json
    _llama(tmp_path / "other")  # the same model; its embedding is then shifted, so the two files differ
    m = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "other"))
    with torch.no_grad():
        m.model.embed_tokens.weight.add_(1.0)
    m.save_pretrained(str(tmp_path / "other"))
    shutil.copyfile(tmp_path / "other" / "model.safetensors", d / "model.safetensors")
    assert (d / "model.safetensors.index.json").is_file()
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(d)).state_dict()
    ours = HFWeights(str(d))
    assert torch.equal(ours.get("model.embed_tokens.weight"), theirs["model.embed_tokens.weight"])


def test_activation_names_are_classified_as_transformers_computes_them():
    """Found as a new user: a Llama config with hidden_act "swish" (transformers' ACT2FN maps it to the
    same nn.SiLU as "silu") and a GPT-2 with activation_function "gelu_python" (exact erf GeLU) were
    refused as activations megatron cannot compute. The oracle is transformers' ACT2FN."""
    import torch
    from transformers.activations import ACT2FN

    from megatron_staged.checkpoint.hf_mapping import GPT2_EXACT_ACTS, GPT2_TANH_GELUS, arch_from_hf_config

    x = torch.linspace(-6, 6, 1001)
    exact = {"gelu": torch.nn.functional.gelu(x), "relu2": torch.relu(x) ** 2}
    for act in GPT2_EXACT_ACTS:  # megatron's exact GeLU or relu(x)^2: equal to round-off
        ref = exact["relu2" if act == "relu2" else "gelu"]
        assert (ACT2FN[act](x) - ref).abs().max() < 1e-6, act
    for act in GPT2_TANH_GELUS:  # imported with the ~1e-3 note: really not exact GeLU
        assert (ACT2FN[act](x) - exact["gelu"]).abs().max() > 1e-5, act
    gpt2 = dict(model_type="gpt2", vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    for act in (*GPT2_EXACT_ACTS, *GPT2_TANH_GELUS):
        assert arch_from_hf_config(dict(gpt2, activation_function=act)).squared_relu == (act == "relu2")
    llama = dict(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                 num_attention_heads=2)
    assert torch.equal(ACT2FN["swish"](x), torch.nn.functional.silu(x))
    assert arch_from_hf_config(dict(llama, hidden_act="swish")).hf_class == "LlamaForCausalLM"


def test_quantized_weights_are_refused_not_upcast(tmp_path):
    """Found as a new user: an FP8 release (Qwen3-*-FP8 style: float8_e4m3 weights with separate
    weight_scale_inv tensors, a quantization_config in config.json) imported without a word: the fp8
    values were copied into fp32 parameters without their scales, a different model."""
    import torch
    from safetensors.torch import load_file, save_file

    from megatron_staged.errors import UserError
    from megatron_staged.tools.hf_import import HFWeights, arch_of, check_hf_shapes

    d = _llama(tmp_path / "fp8")
    sd = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name].to(torch.float8_e4m3fn)
    sd[name.replace(".weight", ".weight_scale_inv")] = torch.ones(1)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    arch = arch_of(cfg, str(d))
    with pytest.raises(UserError, match=rf"{name} is stored as F8_E4M3") as e:
        check_hf_shapes(HFWeights(str(d)), arch)
    assert "\n" not in str(e.value)
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(UserError, match="quantization_config"):
        arch_of(cfg, str(d))
    check_hf_shapes(HFWeights(str(_llama(tmp_path / "plain"))), arch)  # fp32 weights: accepted


def _tree(d) -> dict:
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in sorted(os.listdir(d))}


def test_export_that_fails_part_way_leaves_no_half_written_model(tmp_path, monkeypatch):
    """export-hf wrote config.json, then the weights, then the tokenizer straight into --out: a failure
    part-way (disk full, a killed job) left a directory transformers loads with a missing or old file.
    Now a new --out appears only complete, an --overwrite keeps the previous export until the new one is
    written, and a failure while replacing leaves no config.json (transformers refuses it, loudly)."""
    import safetensors.torch

    from megatron_staged.tools import hf_export

    hf = _llama(tmp_path / "hf")
    _tokenizer(hf, VOCAB)
    ck = tmp_path / "ck"
    run_cli(["import-hf", "--hf", str(hf), "--save", str(ck)])
    out = tmp_path / "out"
    hf_export.export(str(ck), str(out))
    previous = _tree(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(previous)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full_disk)
        with pytest.raises(OSError):
            hf_export.export(str(ck), str(tmp_path / "new"))
        with pytest.raises(OSError):
            hf_export.export(str(ck), str(out), overwrite=True, dtype="bf16")
    assert not (tmp_path / "new").exists() and _tree(out) == previous
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf", "out"]  # no staging directory left behind

    real_replace, calls = os.replace, []

    def dies_on_second(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(a, b)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", dies_on_second)
        with pytest.raises(OSError):
            hf_export.export(str(ck), str(out), overwrite=True, dtype="bf16")
    assert not (out / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # transformers: no config.json, "Unrecognized model"
        transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    hf_export.export(str(ck), str(out), overwrite=True, dtype="bf16")  # and a retry completes it
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.model.embed_tokens.weight.dtype == transformers.AutoConfig.from_pretrained(str(out)).dtype == \
        __import__("torch").bfloat16


def test_export_to_fp16_refuses_weights_beyond_its_range(tmp_path):
    """A weight past fp16's largest value (65504) became inf in `export-hf --dtype fp16`, silently."""
    import torch

    from megatron_staged.errors import UserError
    from megatron_staged.tools.hf_export import export

    hf = _llama(tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 7.0e4  # > torch.finfo(torch.float16).max
    assert torch.finfo(torch.float16).max < 7.0e4
    model.save_pretrained(str(hf))
    run_cli(["import-hf", "--hf", str(hf), "--save", str(tmp_path / "ck")])
    with pytest.raises(UserError, match="beyond that dtype's range") as e:
        export(str(tmp_path / "ck"), str(tmp_path / "out"), dtype="fp16")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    export(str(tmp_path / "ck"), str(tmp_path / "out"), dtype="bf16")  # within bf16's range: exported
    got = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).model.layers[0].mlp.down_proj.weight
    assert got[0, 0].item() == pytest.approx(7.0e4, rel=1e-2)
