"""``megatron-staged export-hf --load CKPT --out DIR``: a checkpoint as a transformers model directory.

Writes ``config.json`` + ``model.safetensors`` loadable with ``AutoModelForCausalLM.from_pretrained``:
``GPT2LMHeadModel`` for the gpt2 family, ``LlamaForCausalLM`` for the llama family (GQA, RoPE,
SwiGLU, tied or untied; ``Qwen2ForCausalLM`` with biases on q/k/v only, ``Qwen3ForCausalLM`` with
per-head q/k norms), plus the tokenizer the checkpoint was trained with (a sentencepiece
``tokenizer.model`` with a LlamaTokenizer config, or the files of a HuggingFace tokenizer).

The architecture always comes from the checkpoint's stored args (so grown checkpoints export with
their grown shapes) and is checked against the stored tensor shapes. Only the tokenizer's rows of
the padded vocabulary are exported; the padded size is kept in config.json as
``megatron_padded_vocab_size``. The true vocabulary size is, in order: ``--vocab-size``, the
vocabulary of the HF model the checkpoint was imported from, the checkpoint's tokenizer.

Runs in one plain process and builds no megatron model (unless ``--verify``, which runs both
models on random tokens and reports the largest logit difference).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_staged.errors import ArgumentParser, UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "spiece.model",
                      "chat_template.jinja", "chat_template.json")
FOREIGN_WEIGHTS = ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def parse_args(argv):
    p = ArgumentParser(prog="megatron-staged export-hf",
                                description="Export a checkpoint as a HuggingFace transformers model directory.")
    p.add_argument("--load", required=True, help="checkpoint: a --save directory or one iter_XXXXXXX directory")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="true vocabulary size (rows to export) when the checkpoint's tokenizer is not available")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: as stored)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (files of the same names are replaced)")
    p.add_argument("--verify", action="store_true",
                   help="run megatron and transformers on random tokens and check the logits agree")
    return p.parse_args(argv)


# ---- tokenizer ------------------------------------------------------------------------------------

@dataclass
class TokenizerInfo:
    kind: str                 # SentencePieceTokenizer | HuggingFaceTokenizer | NullTokenizer
    path: Optional[str]
    vocab_size: int
    bos: Optional[int]
    eos: Optional[int]
    pad: Optional[int]


def checkpoint_tokenizer(cfg) -> Optional[TokenizerInfo]:
    """The tokenizer the checkpoint was trained with, if it can still be loaded (else None)."""
    d = cfg.data
    kind = d.tokenizer_type or ("NullTokenizer" if d.mock_data else None)
    if kind is None:
        return None
    if kind == "NullTokenizer":
        v = cfg.model.vocab_size
        return None if v is None else TokenizerInfo(kind, None, v + 1, None, v, None)
    if not d.tokenizer_model or not os.path.exists(d.tokenizer_model):
        print(f"note: the checkpoint's tokenizer {d.tokenizer_model} is not available; exporting without it")
        return None
    from megatron_staged.data.tokenizer import build_tokenizer

    tok = build_tokenizer(kind, d.tokenizer_model)
    return TokenizerInfo(kind, d.tokenizer_model, tok.vocab_size, tok.bos, tok.eod,
                         tok.pad if tok.pad is not None and tok.pad >= 0 else None)


def true_vocab_size(flag: Optional[int], common: dict, tok: Optional[TokenizerInfo]) -> tuple[int, str]:
    """(rows to export, where that number came from)."""
    if flag is not None:
        return flag, "--vocab-size"
    imported = (common.get("train_state") or {}).get("hf_import") or {}
    if imported.get("vocab_size"):
        return int(imported["vocab_size"]), f"the HF model it was imported from ({imported.get('source')})"
    if tok is not None:
        return tok.vocab_size, f"its {tok.kind}"
    raise UserError("cannot tell the true vocabulary size: the checkpoint's tokenizer is not recorded or not "
                    "available here; pass --vocab-size V (the tokenizer's number of tokens)")


def tokenizer_files(tok: Optional[TokenizerInfo]) -> set:
    """The file names ``write_tokenizer`` writes into --out for ``tok``."""
    if tok is None or tok.kind == "NullTokenizer":
        return set()
    if tok.kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        return {"tokenizer.model", "tokenizer_config.json"}
    if os.path.isdir(tok.path):
        return {f for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(tok.path, f))}
    return {"tokenizer.json"}


def check_no_stale_tokenizer(out: str, tok: Optional[TokenizerInfo]) -> None:
    """Refuse an --out (with --overwrite) holding tokenizer files this export does not replace:
    transformers would load them with the exported model (e.g. an old tokenizer.json next to a new
    sentencepiece tokenizer.model), a tokenizer that is not the checkpoint's. Nothing is deleted."""
    if not os.path.isdir(out):
        return
    stale = sorted(f for f in HF_TOKENIZER_FILES
                   if os.path.isfile(os.path.join(out, f)) and f not in tokenizer_files(tok))
    if stale:
        raise UserError(f"--out {out} holds {', '.join(stale)}, which this export does not replace and transformers "
                        f"would load with it (not the checkpoint's tokenizer); remove them or choose an empty directory")


def write_tokenizer(tok: Optional[TokenizerInfo], out: str, max_length: int) -> str:
    """Copy the tokenizer into ``out``; returns a description."""
    if tok is None or tok.kind == "NullTokenizer":
        return "none (the checkpoint has no text tokenizer)"
    if tok.kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        shutil.copyfile(tok.path, os.path.join(out, "tokenizer.model"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as fh:
            json.dump(sentencepiece_tokenizer_config(tok.path, max_length), fh, indent=2)
        return f"sentencepiece {tok.path} (as LlamaTokenizer)"
    if os.path.isdir(tok.path):
        copied = [f for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(tok.path, f))]
        for f in copied:
            shutil.copyfile(os.path.join(tok.path, f), os.path.join(out, f))
        return f"HuggingFace {tok.path} ({', '.join(copied)})"
    shutil.copyfile(tok.path, os.path.join(out, "tokenizer.json"))
    return f"HuggingFace {tok.path} (as tokenizer.json)"


def sentencepiece_tokenizer_config(model_path: str, max_length: int) -> dict:
    """A LlamaTokenizer config that encodes like GPTSentencePieceTokenizer (no BOS/EOS added)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.load(model_path)
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
           "model_max_length": max_length, "legacy": True}
    for name, idx in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                      ("pad_token", sp.pad_id())):
        if idx >= 0:
            cfg[name] = sp.id_to_piece(idx)
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_path, "rb") as fh:
            proto.ParseFromString(fh.read())
        cfg["add_prefix_space"] = bool(proto.normalizer_spec.add_dummy_prefix)
    except Exception:  # noqa: BLE001 - protobuf missing: transformers' default then applies
        pass
    return cfg


# ---- export ---------------------------------------------------------------------------------------

def load_checkpoint_config(path: str):
    """(checkpoint dir, iteration, common.pt dict, resolved Config) from ``--load``."""
    from megatron_staged.checkpoint.global_tensors import read_common
    from megatron_staged.checkpoint.manager import resolve_checkpoint_dir
    from megatron_staged.config import Config, resolve_model

    ckpt_dir, iteration = resolve_checkpoint_dir(path)
    common = read_common(ckpt_dir)
    if not common.get("args"):
        raise UserError(f"{ckpt_dir}/common.pt holds no args (model config); it was not written by megatron_staged")
    cfg = Config.from_dict(common["args"])
    resolve_model(cfg.model)
    if cfg.model.padded_vocab_size is None:
        raise UserError(f"{ckpt_dir}: args hold no padded_vocab_size; the checkpoint is incomplete")
    return ckpt_dir, int(common.get("iteration", iteration)), common, cfg


def hf_config(arch, tok: Optional[TokenizerInfo], dtype: torch.dtype, extra: dict, imported_ids: Optional[dict] = None):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    from megatron_staged.checkpoint.hf_mapping import GPT2, QWEN2, QWEN3, hf_config_dict

    ids = {"bos_token_id": tok.bos if tok else None, "eos_token_id": tok.eos if tok else None,
           "pad_token_id": tok.pad if tok else None}
    if tok is None:  # no tokenizer: the ids of the HF model the checkpoint was imported from, if any
        ids.update({k: v for k, v in (imported_ids or {}).items() if k in ids})
    kw = hf_config_dict(arch, **ids, **extra)
    kw.pop("model_type")
    config = {GPT2: GPT2Config, QWEN2: Qwen2Config, QWEN3: Qwen3Config}.get(arch.hf_class, LlamaConfig)(**kw)
    config.dtype = str(dtype).replace("torch.", "")
    return config


def check_out_dir(out: str, overwrite: bool = False, source: Optional[str] = None) -> None:
    from megatron_staged.checkpoint.manager import check_output_dir

    check_output_dir(out, "--out", sources=(source,) if source else (), overwrite=overwrite)
    stale = [f for f in FOREIGN_WEIGHTS if os.path.exists(os.path.join(out, f))]
    if stale:
        raise UserError(f"--out {out} already holds {stale[0]}, which transformers would load instead of the "
                        f"export; choose an empty directory")


def check_out_not_a_source(out: str, common: dict, tok: Optional[TokenizerInfo]) -> None:
    """Refuse (even with --overwrite) an --out that is the directory of the checkpoint's tokenizer (read
    while writing: the copy fails half-way) or of the HF model the checkpoint was imported from (its
    weights and config would be replaced by the export)."""
    sources = []
    if tok is not None and tok.path:
        sources.append((tok.path if os.path.isdir(tok.path) else os.path.dirname(os.path.abspath(tok.path)),
                        f"the directory of the checkpoint's tokenizer ({tok.path})"))
    src = ((common.get("train_state") or {}).get("hf_import") or {}).get("source")
    if src:
        sources.append((src, f"the HuggingFace model the checkpoint was imported from ({src})"))
    for path, what in sources:
        if os.path.realpath(out) == os.path.realpath(path):
            raise UserError(f"--out {out} is {what}; the export would overwrite it: give a new directory")


def check_finite(hf_sd: dict, stored: torch.dtype, target: torch.dtype) -> None:
    """UserError for non-finite weights: the checkpoint's own (a diverged run), or values past the
    range of ``--dtype`` (fp16's 65504) that the cast turned into inf."""
    bad = next((k for k, v in hf_sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is None:
        return
    if target != stored:
        raise UserError(f"--dtype {str(target).replace('torch.', '')}: {bad} has values beyond that dtype's range "
                        f"(they would be written as inf, or the checkpoint's are not finite); export in "
                        f"{str(stored).replace('torch.', '')} or bf16")
    raise UserError(f"the checkpoint's {bad} holds inf or NaN values (a diverged run?); export an earlier "
                    f"iteration (--load DIR/iter_XXXXXXX)")


def staging_dir(out: str) -> str:
    """A new directory beside ``out`` that the export is written into before :func:`publish`."""
    import tempfile

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.export-", dir=parent)


def publish(staging: str, out: str) -> None:
    """Move a finished export into place so that a failure at any point leaves ``out`` loadable as it
    was, or not loadable at all, never a mix: a new (or empty) ``out`` is the staging directory renamed;
    into an existing one (--overwrite) config.json is removed first and written last, the other files
    replaced one by one (each rename atomic) in between; files the export does not write stay."""
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.exists(out):
        os.rename(staging, out)
        return
    names = sorted(os.listdir(staging))
    if os.path.exists(os.path.join(out, "config.json")):
        os.remove(os.path.join(out, "config.json"))  # from here until the end transformers refuses `out`
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(os.path.join(staging, name), os.path.join(out, name))


def export(load: str, out: str, vocab_size: Optional[int] = None, dtype: Optional[str] = None,
           overwrite: bool = False) -> dict:
    """Export checkpoint ``load`` to ``out``; returns a summary dict."""
    from safetensors.torch import save_file

    from megatron_staged.checkpoint.global_tensors import read_model_tensors, tensor_specs
    from megatron_staged.checkpoint.hf_mapping import arch_from_model_config, check_checkpoint_shapes, megatron_to_hf

    ckpt_dir, iteration, common, cfg = load_checkpoint_config(load)
    check_out_dir(out, overwrite, ckpt_dir)
    tok = checkpoint_tokenizer(cfg)
    check_out_not_a_source(out, common, tok)
    check_no_stale_tokenizer(out, tok)
    vocab, vocab_source = true_vocab_size(vocab_size, common, tok)
    arch = arch_from_model_config(cfg.model, vocab)
    check_checkpoint_shapes(tensor_specs(ckpt_dir), arch, ckpt_dir)
    hf_sd = megatron_to_hf(read_model_tensors(ckpt_dir), arch)
    stored = next(iter(hf_sd.values())).dtype
    target = DTYPES[dtype] if dtype else stored
    hf_sd = {k: v.to(target) for k, v in hf_sd.items()}
    state = common.get("train_state") or {}
    extra = {"megatron_iteration": iteration,
             "megatron_consumed_samples": int(state.get("consumed_train_samples", 0)),
             "megatron_flops_so_far": float(state.get("flops_so_far", 0.0))}
    check_finite(hf_sd, stored, target)
    config = hf_config(arch, tok, target, extra, state.get("hf_import"))
    staging = staging_dir(out)
    try:
        config.save_pretrained(staging)
        save_file(hf_sd, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        tok_desc = write_tokenizer(tok, staging, cfg.model.seq_length)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"checkpoint": ckpt_dir, "iteration": iteration, "out": out, "architecture": arch.hf_class,
            "num_layers": arch.num_layers, "hidden_size": arch.hidden, "vocab_size": vocab,
            "vocab_source": vocab_source, "padded_vocab_size": arch.padded_vocab,
            "dtype": str(target).replace("torch.", ""), "tokenizer": tok_desc,
            "num_parameters": sum(v.numel() for v in hf_sd.values()), "max_positions": arch.max_positions}


# ---- verification -----------------------------------------------------------------------------------

def megatron_logits(load: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded_V] of checkpoint ``load``, its model built at TP1 PP1 in this process."""
    import torch.distributed as dist

    from megatron_staged.checkpoint.manager import load_checkpoint
    from megatron_staged.model.builder import unwrap
    from megatron_staged.builders import build_components
    from megatron_staged.runtime.distributed import current_device, init_distributed

    _, _, _, cfg = load_checkpoint_config(load)
    init_distributed()
    if dist.get_world_size() != 1:
        raise UserError("--verify runs in one process; launch export-hf without torchrun")
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    model = build_components(cfg, initialize=False, with_optimizer=False).model
    load_checkpoint(load, model, None, None, load_optimizer=False, load_rng=False)
    net = unwrap(model[0])
    net.eval()
    dev = current_device()  # the model's device (a GPU rank: the current CUDA device)
    tokens = tokens.to(dev)
    positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():  # not around the build: megatron DDP needs autograd to hook gradients
        return net(tokens, positions, None).float().cpu()


@torch.no_grad()
def hf_logits(out: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] of the exported model, loaded by transformers in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    model.eval()
    return model(input_ids=tokens).logits.float()


def verify(load: str, out: str, vocab: int, seq: int) -> float:
    """Largest |logit difference| between megatron and transformers on random tokens."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, min(seq, 32)), generator=g)
    ours = megatron_logits(load, tokens)[..., :vocab]
    theirs = hf_logits(out, tokens)
    return float((ours - theirs).abs().max())


def main(argv) -> int:
    args = parse_args(argv)
    s = export(args.load, args.out, args.vocab_size, args.dtype, args.overwrite)
    print(f"exported iteration {s['iteration']} of {s['checkpoint']} to {s['out']} as {s['architecture']}: "
          f"{s['num_layers']} layers, hidden {s['hidden_size']}, {s['num_parameters']:,} parameters, "
          f"{s['dtype']}; vocabulary {s['vocab_size']} (from {s['vocab_source']}) of {s['padded_vocab_size']} "
          f"padded; tokenizer: {s['tokenizer']}", flush=True)
    if args.verify:
        tol = 1e-4 if s["dtype"] == "float32" else 5e-2
        diff = verify(args.load, args.out, s["vocab_size"], min(32, s["max_positions"]))  # learned positions end there
        print(f"verify: max |logit difference| megatron vs transformers = {diff:.3g} (tolerance {tol:g})", flush=True)
        if not diff <= tol:
            raise UserError(f"exported model disagrees with the checkpoint (max logit difference {diff:.3g} > "
                            f"{tol:g}); please report this with `megatron-staged inspect {args.load}`")
    return 0
