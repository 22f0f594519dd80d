"""Checkpoint tools: convert (reshard with optimizer state), inspect, export-hf and import-hf.

Multi-process checks run the real CLI under torchrun (gloo, CPU); launches are shared through a
module-scoped training run to keep the file to a few minutes on 2 cores. HuggingFace models are
built locally from configs with random weights; nothing is downloaded.

Run as a script (``python tests/test_checkpoint_tools.py logits OUT COMMANDS.json NAME=CKPT...``) it
runs the given CLI commands, then computes megatron_staged's logits for the checkpoints on TOKENS, all
in one process (the megatron side of the logits comparisons).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, TINY_LLAMA, losses, run_cli, torchrun  # noqa: E402

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
TEXT = "def f(x):\n    return x + 1  # done\n\nclass A:\n\tpass"


def _layout(tp, pp):
    return ["--target-tensor-model-parallel-size", str(tp), "--target-pipeline-model-parallel-size", str(pp)]


def _train_layout(tp, pp):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


LLAMA_RUN = [*TINY_LLAMA, "--train-iters", "4", "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, corpus):
    """A TP2 PP2 llama run of 4 iterations, saved at 3 and 4: (checkpoint root, its per-iteration losses)."""
    d = tmp_path_factory.mktemp("llama_run")
    log = d / "ref.jsonl"
    torchrun(["train", *LLAMA_RUN, *corpus, *_train_layout(2, 2), "--save-interval", "3", "--save", str(d / "ckpt"),
              "--log-file", str(log)], nproc=4)
    return d / "ckpt", losses(log)


def _common(ckpt_dir):
    from megatron_staged.checkpoint.global_tensors import read_common

    return read_common(str(ckpt_dir))


# ---- convert ------------------------------------------------------------------------------------

def test_convert_round_trip_is_bitwise_and_resumes(llama_run, tmp_path, corpus):
    """TP2 PP2 -> TP1 PP1 (DP2) -> TP2 PP2 reproduces every tensor (moments too) and the next loss."""
    from megatron_staged.checkpoint.global_tensors import read_global_tensors

    root, ref = llama_run
    src = root / "iter_0000003"
    mid, back = tmp_path / "tp1pp1", tmp_path / "tp2pp2"
    torchrun(["convert", "--load", str(src), "--save", str(mid), *_layout(1, 1)], nproc=2)
    torchrun(["convert", "--load", str(mid), "--save", str(back), *_layout(2, 2)], nproc=4)

    assert _common(mid / "iter_0000003")["parallel_layout"] == {"tp": 1, "pp": 1, "dp": 2}
    a, b = read_global_tensors(str(src)), read_global_tensors(str(back / "iter_0000003"))
    assert sorted(a) == sorted(b)
    moments = [k for k in a if k.startswith("optimizer.state.exp_avg")]
    assert len(moments) >= 2 * 9, "Adam moments of every parameter are saved"
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"tensors changed by the round trip: {differ}"
    ca, cb = _common(src), _common(back / "iter_0000003")
    for key in ("iteration", "train_state", "opt_param_scheduler", "optimizer", "args", "parallel_layout",
                "num_floating_point_operations_so_far"):
        assert ca[key] == cb[key], f"common.pt {key} changed by the round trip"
    assert cb["train_state"]["consumed_train_samples"] == 24 and cb["train_state"]["optimizer_step"] == 3

    log = tmp_path / "resume.jsonl"
    torchrun(["train", *LLAMA_RUN, *corpus, *_train_layout(2, 2), "--load", str(back), "--log-file", str(log)],
             nproc=4)
    assert losses(log) == {4: ref[4]}, "resuming the converted checkpoint gives the uninterrupted run's loss"


# ---- inspect ------------------------------------------------------------------------------------

def test_inspect_reports_state_layout_and_tensors(llama_run, capsys):
    from megatron_staged.tools import inspect_ckpt

    root, _ = llama_run
    d = json.loads(run_cli(["inspect", str(root), "--json"]).stdout)  # a plain process, as users run it
    assert d["iteration"] == 4 and d["iterations_in_root"] == [3, 4]
    assert d["consumed_train_samples"] == 32 and d["flops_so_far"] > 0 and d["optimizer_step"] == 4
    assert d["parallel_layout"] == {"tp": 2, "pp": 2, "dp": 1}
    assert d["model"]["num_layers"] == 4 and d["model"]["model_family"] == "llama"
    assert [x[0] for x in d["loss_history"]] == [1, 2, 3, 4] and d["stage_history"] == []
    tensors = {t["key"]: t for t in d["tensors"]}
    padded = d["model"]["padded_vocab_size"]
    assert tensors["embedding.word_embeddings.weight"]["shape"] == [padded, 64]
    assert tensors["decoder.layers.self_attention.linear_qkv.weight"]["shape"] == [4, (4 + 2 * 2) * 16, 64]
    assert tensors["optimizer.state.exp_avg_sq.output_layer.weight"]["dtype"] == "float32"
    inspect_ckpt.main(["--load", str(root / "iter_0000003"), "--no-tensors"])  # the other tools' spelling
    text = capsys.readouterr().out
    assert "TP2 PP2 DP1" in text and re.search(r"^iteration\s+3\b", text, re.M)


# ---- HF export / import ----------------------------------------------------------------------------

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def _hf_models(d):
    """A GPT-2, a GQA Llama, a GQA Qwen2 (biases on q/k/v only) and a Qwen3 (per-head q/k norms) with large
    random weights (so logits are sensitive to any mix-up)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                                      activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                      initializer_range=0.2, bos_token_id=0, eos_token_id=1))
    # with Llama 3.1's RoPE scaling (megatron's --use-rope-scaling --rope-scaling-factor)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                         rms_norm_eps=1e-5, rope_parameters=LLAMA31_ROPE, initializer_range=0.2,
                                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1))
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.2,
                                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=0,
                                         eos_token_id=1))
    with torch.no_grad():
        for model in (gpt2, llama, qwen2, qwen3):
            for _, p in model.named_parameters():
                if p.dim() == 1:  # norm weights (init 1) and biases (init 0): move them off their init
                    p.normal_(1.0 if bool(torch.all(p == 1)) else 0.0, 0.1)
    paths = {}
    for name, model in (("gpt2", gpt2), ("llama", llama), ("qwen2", qwen2), ("qwen3", qwen3)):
        paths[name] = d / f"hf_{name}"
        model.save_pretrained(paths[name])
    return paths


def _hf_logits(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _megatron_logits(tmp_path, ckpts: dict, first: list) -> dict:
    """megatron_staged's logits [b, s, padded_V] for each checkpoint, in one process (this file as a
    script), which first runs the CLI commands ``first`` (one plain process saves the launches)."""
    out = tmp_path / "megatron_logits.pt"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    (tmp_path / "commands.json").write_text(json.dumps(first))
    args = [f"{k}={v}" for k, v in ckpts.items()]
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "logits", str(out), str(tmp_path / "commands.json"),
                        *args], cwd=str(ROOT), capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return torch.load(out)


def _max_diff(ours, theirs) -> float:
    return float((ours[..., : theirs.shape[-1]] - theirs).abs().max())


def test_export_and_import_match_transformers(llama_run, tmp_path):
    """Trained (TP2 PP2), grown and imported checkpoints: transformers' logits == megatron_staged's."""
    from safetensors.torch import load_file

    root, _ = llama_run
    hf = _hf_models(tmp_path)
    imp_gpt2, imp_llama, grown = tmp_path / "imp_gpt2", tmp_path / "imp_llama", tmp_path / "grown"
    run_cli(["import-hf", "--hf", str(hf["gpt2"]), "--save", str(imp_gpt2)])
    torchrun(["import-hf", "--hf", str(hf["llama"]), "--save", str(imp_llama), *_layout(2, 1)], nproc=2)
    # a grown checkpoint: 3x48 -> 6x96, i.e. not the shape any flag or default says
    run_cli(["grow", "--load", str(imp_gpt2), "--save", str(grown), "--depth-factor", "2", "--width-factor", "2"])
    # Qwen2 (--disable-bias-linear --add-qkv-bias) and Qwen3 (--qk-layernorm): imported, grown in depth and
    # width, exported
    for name in ("qwen2", "qwen3"):
        run_cli(["import-hf", "--hf", str(hf[name]), "--save", str(tmp_path / f"imp_{name}")])
        run_cli(["grow", "--load", str(tmp_path / f"imp_{name}"), "--save", str(tmp_path / f"grown_{name}"),
                 "--depth-factor", "2", "--width-factor", "2"])
    exported = {name: tmp_path / f"export_{name}" for name in ("trained", "grown", "llama_back", "qwen2_back",
                                                                 "grown_qwen2", "qwen3_back", "grown_qwen3")}
    sources = {"trained": root, "grown": grown, "llama_back": imp_llama,
               **{f"{n}_back": tmp_path / f"imp_{n}" for n in ("qwen2", "qwen3")},
               **{f"grown_{n}": tmp_path / f"grown_{n}" for n in ("qwen2", "qwen3")}}
    exports = [["export-hf", "--load", str(sources[name]), "--out", str(out)] for name, out in exported.items()]
    ours = _megatron_logits(tmp_path, {"trained": root, "grown": grown, "imp_gpt2": imp_gpt2, "imp_llama": imp_llama,
                                       **{f"imp_{n}": tmp_path / f"imp_{n}" for n in ("qwen2", "qwen3")},
                                       **{f"grown_{n}": tmp_path / f"grown_{n}" for n in ("qwen2", "qwen3")}},
                            first=exports)

    # import-hf then export-hf gives back the HF weights exactly
    for name in ("llama", "qwen2", "qwen3"):
        orig, back = load_file(hf[name] / "model.safetensors"), load_file(exported[name + "_back"] / "model.safetensors")
        assert sorted(orig) == sorted(back) and all(torch.equal(orig[k], back[k]) for k in orig), name
    # logits: exported model in transformers vs the checkpoint in megatron_staged, and import the other way
    pairs = {"trained": exported["trained"], "grown": exported["grown"],
             "imp_gpt2": hf["gpt2"], "imp_llama": hf["llama"], "imp_qwen2": hf["qwen2"], "imp_qwen3": hf["qwen3"],
             "grown_qwen2": exported["grown_qwen2"], "grown_qwen3": exported["grown_qwen3"]}
    for name, hf_dir in pairs.items():
        theirs = _hf_logits(hf_dir)
        assert theirs.abs().max() > 0.1, name
        assert _max_diff(ours[name], theirs) <= 1e-4, f"{name}: logits differ by {_max_diff(ours[name], theirs)}"

    # the llama's RoPE scaling matters at these positions (so the equality above has teeth), and exports back
    unscaled = tmp_path / "hf_llama_unscaled"
    c = json.loads((hf["llama"] / "config.json").read_text())
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    unscaled.mkdir()
    (unscaled / "config.json").write_text(json.dumps(c))
    (unscaled / "model.safetensors").write_bytes((hf["llama"] / "model.safetensors").read_bytes())
    assert _max_diff(ours["imp_llama"], _hf_logits(unscaled)) > 1e-2
    rope = json.loads((exported["llama_back"] / "config.json").read_text())["rope_parameters"]
    assert {k: rope[k] for k in LLAMA31_ROPE} == LLAMA31_ROPE

    cfg = json.loads((exported["trained"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert cfg["vocab_size"] == 512 and cfg["megatron_padded_vocab_size"] == ours["trained"].shape[-1]
    assert json.loads((exported["grown"] / "config.json").read_text())["n_layer"] == 6
    # the grown Qwen2 / Qwen3 (4 layers, hidden 128) keep their architecture and the original's function
    for name, arch in (("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")):
        grown_cfg = json.loads((exported["grown_" + name] / "config.json").read_text())
        assert (grown_cfg["architectures"], grown_cfg["num_hidden_layers"], grown_cfg["hidden_size"]) == (
            [arch], 4, 128)
        assert _max_diff(ours["grown_" + name], _hf_logits(hf[name])) <= 1e-4, name
    sp_model = _common(root / "iter_0000004")["args"]["data"]["tokenizer_model"]
    _check_sentencepiece_tokenizer(exported["trained"], sp_model)


def _check_sentencepiece_tokenizer(out, sp_model):
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor()
    sp.load(sp_model)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tok) == sp.get_piece_size()
    assert tok(TEXT).input_ids == sp.encode(TEXT)


# ---- the mapping, in process ---------------------------------------------------------------------

def test_qkv_layout_is_per_query_group():
    """Megatron's fused QKV rows: for each group [its q heads; k; v]; HF keeps q, k, v apart."""
    from megatron_staged.checkpoint.hf_mapping import hf_to_qkv, qkv_to_hf

    q, k, v = torch.tensor([0., 1, 2, 3]), torch.tensor([10., 11]), torch.tensor([20., 21])  # H=4, G=2, d=1
    fused = hf_to_qkv(q, k, v, heads=4, groups=2, head_dim=1)
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(x, y) for x, y in zip(qkv_to_hf(fused, 4, 2, 1), (q, k, v)))


@pytest.mark.parametrize("hf_class", ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_hf_to_megatron_to_hf_is_exact(hf_class):
    from megatron_staged.checkpoint.hf_mapping import Arch, expected_hf_shapes, hf_to_megatron, megatron_to_hf

    gpt2, qwen2 = hf_class == "GPT2LMHeadModel", hf_class == "Qwen2ForCausalLM"
    a = Arch(hf_class=hf_class, num_layers=3, hidden=32, ffn=48, heads=4, groups=4 if gpt2 else 2, head_dim=8,
             vocab=100, padded_vocab=128, max_positions=16, norm_eps=1e-5, rotary_base=10000, bias=gpt2, tied=gpt2,
             qkv_bias=qwen2, qk_norm=hf_class == "Qwen3ForCausalLM")
    hf = {k: torch.randn(s) for k, s in expected_hf_shapes(a).items()}
    # Qwen2: biases on q, k and v only (transformers' Qwen2Attention)
    assert {k.split(".", 3)[-1] for k in hf if k.endswith("bias")} == (
        {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"} if qwen2 else
        set() if not gpt2 else {k.split(".", 3)[-1] for k in hf if k.endswith("bias")})
    meg = hf_to_megatron(hf.__getitem__, a)
    assert meg["embedding.word_embeddings.weight"].shape == (128, 32)
    assert meg["decoder.layers.self_attention.linear_qkv.weight"].shape == (3, (4 + 2 * a.groups) * 8, 32)
    if a.qk_norm:  # Qwen3: one RMSNorm weight over the head size per layer for q and one for k
        assert meg["decoder.layers.self_attention.q_layernorm.weight"].shape == (3, 8)
        assert hf["model.layers.0.self_attn.k_norm.weight"].shape == (8,)
    back = megatron_to_hf(meg, a)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


# ---- bad input ---------------------------------------------------------------------------------------

def test_bad_input_is_one_line_error(tmp_path):
    r = run_cli(["export-hf", "--load", str(tmp_path / "nope"), "--out", str(tmp_path / "out")], check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such directory" in r.stderr
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = run_cli(["import-hf", "--hf", str(bert), "--save", str(tmp_path / "ckpt")], check=False)
    assert r.returncode == 2 and "gpt2, llama, qwen2 and qwen3" in r.stderr and "Traceback" not in r.stderr


# ---- script mode: megatron_staged's logits -------------------------------------------------------------

def _logits_main(out: str, commands: str, pairs: list[str]) -> None:
    from megatron_staged.cli import main
    from megatron_staged.tools.hf_export import megatron_logits

    for argv in json.loads(open(commands).read()):  # commands that need no process group (export-hf)
        assert main(argv) == 0, argv
    result = {}
    for pair in pairs:
        name, path = pair.split("=", 1)
        result[name] = megatron_logits(path, TOKENS)
    torch.save(result, out)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "logits":
        _logits_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(f"usage: {sys.argv[0]} logits OUT COMMANDS.json NAME=CKPT...")


def test_rope_scaling_megatron_cannot_express_is_refused():
    """megatron-core's Llama 3.1 RoPE scaling fixes all but the factor: another context or another
    scaling type is refused in one line, not imported as a model that computes something else."""
    from megatron_staged.checkpoint.hf_mapping import arch_from_hf_config
    from megatron_staged.errors import UserError

    base = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=100)
    a = arch_from_hf_config(dict(base, rope_parameters=dict(LLAMA31_ROPE, factor=32.0)))
    assert a.rope_scaling_factor == 32.0 and a.rotary_base == 500000
    for rope in (dict(LLAMA31_ROPE, original_max_position_embeddings=4096),
                 {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}):
        with pytest.raises(UserError) as e:
            arch_from_hf_config(dict(base, rope_parameters=rope))
        assert "\n" not in str(e.value) and "RoPE" in str(e.value)


def test_export_verify_of_a_gpt2_with_a_short_context(tiny_checkpoint, tmp_path):
    """Found as a new user: `export-hf --verify` ran 32 random tokens through a gpt2 checkpoint with
    16 learned positions (seq 16): IndexError traceback from the position embedding."""
    r = run_cli(["export-hf", "--load", str(tiny_checkpoint), "--out", str(tmp_path / "hf"), "--verify"], check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    diff = float(r.stdout.split("megatron vs transformers = ")[1].split()[0])
    assert diff <= 1e-4


def test_export_refuses_partial_rotary_llama():
    """Found as a new user: a llama checkpoint trained with --rotary-percent 0.5 exported as a
    LlamaForCausalLM that rotates every channel (logits off by 1e-3; only --verify noticed)."""
    from megatron_staged.checkpoint.hf_mapping import arch_from_model_config
    from megatron_staged.config import ModelConfig, resolve_model
    from megatron_staged.errors import UserError

    m = resolve_model(ModelConfig(model_family="llama", num_layers=1, hidden_size=32, num_attention_heads=4,
                                  padded_vocab_size=128))
    assert arch_from_model_config(m, 100).hf_class  # full rotary: exported
    m.rotary_percent = 0.5
    with pytest.raises(UserError, match=r"rotates 0.5 of each head's channels"):
        arch_from_model_config(m, 100)


def test_inspect_names_the_virtual_pipeline_stages(tiny_checkpoint, capsys):
    """Found as a new user: a checkpoint saved at TP1 PP2 VP2 was shown by `inspect` as 'TP1 PP2 DP1'
    (the 'vp' of its parallel_layout dropped); convert's and grow's summary lines dropped it too."""
    from megatron_staged.tools.inspect_ckpt import describe, print_text

    d = describe(str(tiny_checkpoint))
    print_text(d, with_tensors=False)
    assert re.search(r"saved layout\s+TP1 PP1 DP1$", capsys.readouterr().out, re.M)
    d["parallel_layout"] = dict(d["parallel_layout"], pp=2, vp=2)
    print_text(d, with_tensors=False)
    assert re.search(r"saved layout\s+TP1 PP2 VP2 DP1$", capsys.readouterr().out, re.M)


def test_import_hf_gpt2_seq_length_beyond_its_positions_names_the_hf_limit(tmp_path):
    """Found as a new user: `import-hf --hf GPT2(n_positions=24) --seq-length 64` said
    '--max-position-embeddings 24 < --seq-length 64', naming a flag import-hf does not have."""
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=24,
                                                         activation_function="gelu", bos_token_id=0, eos_token_id=1)).save_pretrained(str(hf))
    r = run_cli(["import-hf", "--hf", str(hf), "--save", str(tmp_path / "c"), "--seq-length", "64"], check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --seq-length 64 exceeds the HF model's 24 learned positions"), r.stderr[-2000:]
    run_cli(["import-hf", "--hf", str(hf), "--save", str(tmp_path / "ok"), "--seq-length", "24"])


def test_bf16_import_trains_without_the_distributed_optimizer(tmp_path):
    """Found as a new user: `import-hf --dtype bf16` then `train --bf16 --load` (no distributed optimizer)
    died with torch Adam's KeyError 'step' loading the iteration-0 optimizer state (megatron leaves a
    step of 0 out of the saved state)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=4,
                               activation_function="gelu", bos_token_id=0, eos_token_id=1)).save_pretrained(str(hf))
    run_cli(["import-hf", "--hf", str(hf), "--save", str(tmp_path / "ck"), "--dtype", "bf16"])
    log = tmp_path / "log.jsonl"
    run_cli(["train", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--model-family",
             "gpt2", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--micro-batch-size", "2", "--train-iters", "2", "--bf16", "--lr", "1e-3", "--load", str(tmp_path / "ck"),
             "--log-interval", "1", "--eval-iters", "0", "--progress-bar", "off", "--log-file", str(log)])
    assert sorted(losses(log)) == [1, 2]
