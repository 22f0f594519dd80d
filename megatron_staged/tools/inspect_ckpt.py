"""``megatron-staged inspect CKPT [--json]``: what a checkpoint holds, without building a model.

Prints the model config, iteration, consumed samples, FLOPs so far, optimizer step, the LR-schedule
state, the growth/stage history, the parallel layout it was saved with, and every tensor with its
global shape and dtype (read from the torch DCP ``.metadata`` file; no tensor data is loaded).
Runs in one plain process in a few seconds; ``--json`` prints one JSON object for scripts.
"""
from __future__ import annotations

import json
import math
import os

from megatron_staged.errors import ArgumentParser, UserError


def parse_args(argv):
    p = ArgumentParser(prog="megatron-staged inspect", description="Describe a checkpoint.")
    p.add_argument("checkpoint", nargs="?", help="a --save directory (its latest iteration) or one iter_XXXXXXX "
                   "directory")
    p.add_argument("--load", default=None, help="the same, spelled as the other tools spell it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-tensors", action="store_true", help="leave out the tensor list")
    p.add_argument("--verify", action="store_true",
                   help="check every file against the sizes and CRC-32 checksums recorded at save time (reads "
                        "every byte) and the byte ranges .metadata lists; exit status 1 if damaged")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.load is None):
        p.error("give one checkpoint: `inspect CKPT` or `inspect --load CKPT`")
    args.checkpoint = args.checkpoint or args.load
    return args


def verify(path: str) -> int:
    """``inspect --verify``: every iteration's files against its manifest; 0 if all intact, else 1."""
    from megatron_staged.checkpoint.integrity import read_manifest, problems
    from megatron_staged.checkpoint.manager import is_checkpoint_root, iter_dir, list_iterations, read_tracker

    if is_checkpoint_root(path):
        latest = read_tracker(path)
        dirs = [iter_dir(path, i) for i in list_iterations(path)]
        if latest is not None and iter_dir(path, latest) not in dirs:
            print(f"DAMAGED {iter_dir(path, latest)}: named by the tracker but missing")
            bad = 1
        else:
            bad = 0
    else:
        dirs, bad = [path], 0
    for d in dirs:
        try:
            found = problems(d, checksums=True)
            has_manifest = read_manifest(d) is not None
        except UserError as e:
            found, has_manifest = [str(e)], False
        if found:
            bad += 1
            print(f"DAMAGED {d}: " + "; ".join(found))
        else:
            how = "sizes and CRC-32 match manifest.json" if has_manifest else \
                "no manifest.json (saved by an older version): file sizes match .metadata only"
            print(f"ok      {d}: {how}")
    return 1 if bad else 0


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe(path: str) -> dict:
    """Everything ``inspect`` reports, as a JSON-serialisable dict."""
    from megatron_staged.checkpoint.global_tensors import OPTIMIZER_PREFIX, read_common, tensor_specs
    from megatron_staged.checkpoint.manager import list_iterations, resolve_checkpoint_dir

    ckpt_dir, _ = resolve_checkpoint_dir(path)
    common = read_common(ckpt_dir)
    specs = tensor_specs(ckpt_dir)
    state = dict(common.get("train_state") or {})
    args = common.get("args") or {}
    model_tensors = {k: v for k, v in specs.items() if not k.startswith(OPTIMIZER_PREFIX)}
    loss_history = [list(x) for x in state.pop("loss_history", [])]
    return {
        "path": os.path.abspath(ckpt_dir),
        "iteration": common.get("iteration"),
        "saved_by": common.get("saved_by"),
        "optimizer_format": (common.get("content_metadata") or {}).get("distrib_optim_sharding_type"),
        "iterations_in_root": list_iterations(os.path.dirname(os.path.abspath(ckpt_dir))),
        "model": args.get("model"),
        "parallel": args.get("parallel"),
        "parallel_layout": common.get("parallel_layout"),
        "consumed_train_samples": state.get("consumed_train_samples"),
        "flops_so_far": state.get("flops_so_far", common.get("num_floating_point_operations_so_far")),
        "optimizer_step": state.get("optimizer_step"),
        "has_optimizer": state.get("has_optimizer"),
        "stage_history": state.get("stage_history", []),
        "hf_import": state.get("hf_import"),
        "loss_history": loss_history,
        "opt_param_scheduler": common.get("opt_param_scheduler"),
        "data": {k: (args.get("data") or {}).get(k)
                 for k in ("tokenizer_type", "tokenizer_model", "data_path", "mock_data")},
        "num_parameters": sum(math.prod(shape) for shape, _ in model_tensors.values()),
        "tensors": [{"key": k, "shape": list(shape), "dtype": dtype_name(dt)}
                    for k, (shape, dt) in sorted(specs.items(), key=lambda kv: kv[0].startswith(OPTIMIZER_PREFIX))],
    }


def model_line(m: dict) -> str:
    if not m:
        return "(no args stored)"
    groups = m.get("num_query_groups")
    gqa = f", {groups} query groups" if m.get("group_query_attention") else ""
    dtype = "bf16" if m.get("bf16") else "fp16" if m.get("fp16") else "fp32"
    return (f"{m.get('model_family')}: {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, "
            f"ffn {m.get('ffn_hidden_size')}, {m.get('num_attention_heads')} heads{gqa} "
            f"of size {m.get('kv_channels')}, "
            f"{m.get('normalization')}, {'SwiGLU' if m.get('swiglu') else 'squared ReLU' if m.get('squared_relu') else 'GeLU'}, {m.get('position_embedding_type')} "
            f"positions (max {m.get('max_position_embeddings')}), seq {m.get('seq_length')}, "
            f"{'untied' if m.get('untie_embeddings_and_output_weights') else 'tied'} output, "
            f"{'no ' if m.get('disable_bias_linear') else ''}linear biases, padded vocabulary "
            f"{m.get('padded_vocab_size')}, {dtype}")


def schedule_line(s: dict) -> str:
    if not s:
        return "(not stored)"
    return (f"step {s.get('num_steps')}, {s.get('lr_decay_style')} from max lr {s.get('max_lr')} to min "
            f"{s.get('min_lr')}, warmup {s.get('lr_warmup_steps')}, decay steps {s.get('lr_decay_steps')}")


def stage_line(s) -> str:
    """One growth stage: 'iteration 200: depth 4x256 -> 8x256, TP1 PP1 -> TP1 PP2, rho 1.4'."""
    if not isinstance(s, dict):
        return str(s)
    a, b = s.get("from"), s.get("to")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ", ".join(f"{k}={v}" for k, v in s.items())
    shape = lambda d: f"{d.get('num_layers')}x{d.get('hidden_size')}"  # noqa: E731
    lay = lambda d: f"TP{d.get('tp', '?')} PP{d.get('pp', '?')}"  # noqa: E731
    rho = f", rho {s['rho']:.3g}" if isinstance(s.get("rho"), (int, float)) else ""
    return (f"iteration {s.get('iteration')}: {s.get('operator', 'growth')} {shape(a)} -> {shape(b)}, "
            f"{lay(a)} -> {lay(b)}{rho}")


def print_text(d: dict, with_tensors: bool) -> None:
    lay = d["parallel_layout"] or {}
    its = d["iterations_in_root"]
    rows = [
        ("checkpoint", d["path"] + (" (saved by Megatron-LM)" if d.get("saved_by") == "Megatron-LM" else "")),
        ("iteration", f"{d['iteration']}"
         + (f" (saved iterations here: {', '.join(map(str, its))})" if len(its) > 1 else "")),
        ("model", model_line(d["model"])),
        ("parameters", f"{d['num_parameters']:,} (padded vocabulary rows included)"),
        ("saved layout", f"TP{lay.get('tp', '?')} PP{lay.get('pp', '?')}" + (f" VP{lay['vp']}" if lay.get("vp") else "")
         + f" DP{lay.get('dp', '?')}"),
        ("consumed", f"{d['consumed_train_samples']} samples"),
        ("FLOPs so far", f"{d['flops_so_far']:.4g}" if d["flops_so_far"] is not None else "?"),
        ("optimizer", f"step {d['optimizer_step']}, state {'saved' if d['has_optimizer'] else 'not saved'}"
         + (f" ({d['optimizer_format']})" if d.get("optimizer_format") and d["has_optimizer"] else "")),
        ("LR schedule", schedule_line(d["opt_param_scheduler"])),
        ("last loss", f"{d['loss_history'][-1][1]:.4f} at iteration {d['loss_history'][-1][0]}"
         if d["loss_history"] else "-"),
        ("tokenizer", f"{d['data']['tokenizer_type']} {d['data']['tokenizer_model'] or ''}".strip()
         if d["data"]["tokenizer_type"] else ("NullTokenizer (mock data)" if d["data"]["mock_data"] else "-")),
    ]
    if d["hf_import"]:
        rows.append(("imported from", f"{d['hf_import'].get('architecture')} {d['hf_import'].get('source')}"))
    stages = d["stage_history"]
    rows.append(("stage history", "none" if not stages else f"{len(stages)} stage(s)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for i, s in enumerate(stages):
        print(f"  {i + 1}. {stage_line(s)}")
    if with_tensors:
        tensors = d["tensors"]
        n_opt = sum(t["key"].startswith("optimizer.") for t in tensors)
        print(f"tensors ({len(tensors) - n_opt} model, {n_opt} optimizer), global shapes:")
        kw = max((len(t["key"]) for t in tensors), default=0)
        for t in tensors:
            print(f"  {t['key']:<{kw}}  {str(t['shape']):<18} {t['dtype']}")


def main(argv) -> int:
    args = parse_args(argv)
    if not os.path.exists(args.checkpoint):
        raise UserError(f"{args.checkpoint}: no such checkpoint directory")
    if args.verify:
        return verify(args.checkpoint)
    d = describe(args.checkpoint)
    if args.no_tensors:
        d.pop("tensors")
    if args.json:
        print(json.dumps(d, default=str))
    else:
        print_text(d, not args.no_tensors)
    return 0
