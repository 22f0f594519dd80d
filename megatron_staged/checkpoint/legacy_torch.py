"""Megatron-LM's legacy ``--ckpt-format torch`` checkpoints, read without Megatron-LM.

Layout (Megatron-LM ``core_v0.16.1``, ``checkpointing.py`` ``get_checkpoint_name``)::

    ROOT/latest_checkpointed_iteration.txt
    ROOT/iter_XXXXXXX/mp_rank_TT/model_optim_rng.pt          (PP 1)
    ROOT/iter_XXXXXXX/mp_rank_TT_PPP/model_optim_rng.pt      (PP > 1)
    ROOT/iter_XXXXXXX/mp_rank_TT[_PPP]/distrib_optim.pt      (--use-distributed-optimizer)

Each ``model_optim_rng.pt`` is one (TP, PP) rank's ``torch.save`` of ``args`` (the Namespace),
``iteration``, ``model`` (``model0``, ``model1``, ... with interleaving: the rank's
``state_dict_for_save_checkpoint``, layers numbered locally from 0), ``optimizer``,
``opt_param_scheduler`` (steps in samples), ``rng_state`` and ``num_floating_point_operations_so_far``.
Every file is read with the restricted unpickler (``safe_load.load_torch_file``).

Whole tensors are rebuilt with megatron-core's partition dims: column-parallel ``linear_qkv`` and
``linear_fc1`` along dim 0 (the fused QKV rows are grouped per query group and each TP rank holds
whole groups, so a plain concatenation keeps the layout; with ``--swiglu`` each rank's ``linear_fc1``
is its own ``[gate_r; up_r]``, so the whole tensor is ``[gate_0 .. gate_T-1; up_0 .. up_T-1]``, which is
how megatron-core's torch_dist stores it), row-parallel ``linear_proj``/``linear_fc2`` weights along
dim 1, the vocab-parallel embedding and output layer along dim 0; everything else (norms, row-parallel
biases, position embeddings) is replicated. Pipeline ranks hold consecutive layers: the local numbers
are offset by the layers of the earlier stages (and, with interleaving, of the earlier virtual stages),
with the split of the checkpoint's own args (``config.pipeline_layer_counts``).

The optimizer state is carried over for the non-distributed Adam in fp32 and bf16 (``optimizer.state``
indexes torch's parameter order: megatron-core's param groups, weight-decayed first, each in the
model's parameter order; bf16's fp32 master weights are listed in the same order; checked against
every tensor's shape). The distributed optimizer's ``distrib_optim.pt`` is handed to megatron-core's own
``load_parameter_state_from_dp_zero`` at the saved TP/PP (any DP; ``convert``/``grow`` reach other
layouts through ``<save>.megatron_lm_import``). fp16's optimizer (loss scaler) is refused in one line
naming ``--no-load-optim``/``--finetune`` (``convert``: ``--no-optimizer``), never dropped silently.

The loaded state is put into an already-built model/optimizer at any layout the same way
dist_checkpointing would: each of the model's (and optimizer's) ``ShardedTensor`` s is cut from the
whole tensor at its global offset (:func:`load_into`).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Optional

import torch

from megatron_staged.errors import UserError

MODEL_FILE = "model_optim_rng.pt"
DIST_OPTIM_FILE = "distrib_optim.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
          "mlp.linear_fc1.bias")
ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
              "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
              "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
              "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
              "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
              "self_attention.linear_proj.bias", "mlp.linear_fc2.bias",
              "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "embedding.position_embeddings.weight")
# the local spec's norm names and the Transformer Engine spec's (norm fused into the next linear)
NORM_ALIASES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
                "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
NORM_ALIASES.update({v: k for k, v in list(NORM_ALIASES.items())})


def rank_dirs(ckpt_dir: str) -> dict:
    """``{(tp, pp): path}`` of the ``mp_rank_*`` directories holding a rank's files; {} if none."""
    out = {}
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return out
    for name in names:
        m = _RANK_DIR.match(name)
        sub = os.path.join(ckpt_dir, name)
        if m and os.path.isdir(sub) and any(f in (MODEL_FILE, "model_rng.pt", DIST_OPTIM_FILE) for f in os.listdir(sub)):
            if m.group(3) is not None:
                raise UserError(f"{ckpt_dir}: {name} is an expert-parallel rank of a Megatron-LM legacy 'torch' "
                                f"checkpoint; mixture-of-experts models are not supported by megatron_staged")
            out[(int(m.group(1)), int(m.group(2) or 0))] = sub
    return out


def is_legacy_dir(ckpt_dir: str) -> bool:
    """An ``iter_XXXXXXX`` (or ``release``) directory of Megatron-LM's legacy torch format."""
    try:
        return bool(rank_dirs(ckpt_dir))
    except UserError:
        return True


def refuse_pre_mcore(ckpt_dir: str, sd: dict) -> None:
    """Megatron-LM's legacy (pre-megatron-core) GPT model (``--use-legacy-models``; before it, the
    default without ``--use-mcore-models``) saves ``language_model.{embedding,encoder,output_layer}``
    instead of megatron-core's keys: refused in one line, before anything is built."""
    args = sd.get("args")
    chunks = [v for k, v in sd.items() if (k == "model" or re.match(r"model\d+$", k)) and isinstance(v, dict)]
    old_keys = any("language_model" in c or any(str(k).startswith("language_model.") for k in c) for c in chunks)
    flagged = bool(getattr(args, "use_legacy_models", False)) or (
        not hasattr(args, "use_legacy_models") and getattr(args, "use_mcore_models", True) is False)
    if old_keys or flagged:
        why = "its model holds language_model.* keys" if old_keys else "its args say --use-legacy-models"
        raise UserError(f"{ckpt_dir} is a checkpoint of Megatron-LM's legacy (pre-megatron-core) GPT model "
                        f"({why}), which megatron_staged does not read (megatron-core GPTModel checkpoints only); "
                        f"convert it to megatron-core in Megatron-LM first: tools/checkpoint/convert.py "
                        f"--model-type GPT --loader legacy with its megatron-core saver")


def problems(ckpt_dir: str) -> list:
    """Missing or unreadable rank files (the TP x PP grid of the first rank's args)."""
    from megatron_staged.checkpoint.safe_load import UnsafeCheckpoint

    ranks = rank_dirs(ckpt_dir)
    first = ranks.get((0, 0))
    if first is None or not os.path.isfile(os.path.join(first, MODEL_FILE)):
        with_pp = any(len(os.path.basename(d)) > len("mp_rank_00") for d in ranks.values())
        return [f"{os.path.join(ckpt_dir, 'mp_rank_00' + ('_000' if with_pp else ''), MODEL_FILE)} is missing"]
    try:
        sd0 = _load(os.path.join(first, MODEL_FILE))
        args = sd0.get("args")
    except UnsafeCheckpoint:
        raise
    except UserError as e:
        return [str(e)]
    refuse_pre_mcore(ckpt_dir, sd0)
    if getattr(args, "num_experts", None) or int(getattr(args, "expert_model_parallel_size", 1) or 1) > 1:
        raise UserError(f"{ckpt_dir} is a Megatron-LM mixture-of-experts checkpoint (--num-experts); "
                        f"megatron_staged supports dense GPT models only")
    tp, pp = int(getattr(args, "tensor_model_parallel_size", 1)), int(getattr(args, "pipeline_model_parallel_size", 1))
    found = []
    for t in range(tp):
        for p in range(pp):
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            path = os.path.join(ckpt_dir, name, MODEL_FILE)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                found.append(f"{path} is missing (the checkpoint's args say TP{tp} PP{pp})")
    return found


@lru_cache(maxsize=64)
def _load_cached(path: str, mtime: float, size: int) -> dict:
    from megatron_staged.checkpoint.safe_load import load_torch_file

    sd = load_torch_file(path)
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a Megatron-LM checkpoint state dict")
    return sd


def _load(path: str) -> dict:
    st = os.stat(path)
    return _load_cached(path, st.st_mtime, st.st_size)


def rank_files(ckpt_dir: str) -> dict:
    """``{(tp, pp): state dict}`` of every rank (problems() first: a missing rank is a UserError)."""
    found = problems(ckpt_dir)
    if found:
        raise UserError(f"damaged checkpoint: {found[0]}")
    return {k: _load(os.path.join(d, MODEL_FILE)) for k, d in sorted(rank_dirs(ckpt_dir).items())
            if os.path.isfile(os.path.join(d, MODEL_FILE))}


def read_common(ckpt_dir: str) -> dict:
    """``common.pt`` as this project reads it (``megatron_lm.normalize_common``), from rank (0, 0)'s file."""
    from megatron_staged.checkpoint.megatron_lm import normalize_common

    files = rank_files(ckpt_dir)
    raw = {k: v for k, v in files[(0, 0)].items() if k not in ("model", "rng_state") and not re.match(r"model\d+$", k)}
    ns = raw.get("args")
    import argparse

    if not isinstance(ns, argparse.Namespace):
        raise UserError(f"{ckpt_dir}: {MODEL_FILE} holds no Megatron-LM args Namespace; not a Megatron-LM checkpoint")
    if raw.get("iteration") is None:
        raw["iteration"] = 0
    common = normalize_common(raw)
    common["legacy_torch_format"] = True  # saved_by: "Megatron-LM", as its torch_dist checkpoints
    reason = optimizer_refusal(ckpt_dir, files)
    if reason:
        common["legacy_optimizer_refusal"] = reason
    elif getattr(ns, "use_distributed_optimizer", False) and common["train_state"].get("has_optimizer"):
        # flat buffers readable at the saved TP/PP only, as Megatron-LM's default torch_dist form: convert
        # and grow first convert at the saved layout (tools/grow.py needs_import)
        common["content_metadata"] = {"distrib_optim_sharding_type": "dp_reshardable"}
    _load_cached.cache_clear()  # the rank files are not kept in memory (they may be the whole model)
    return common


# ---- whole tensors ------------------------------------------------------------------------------

def _merge(name: str, parts: list, swiglu: bool, where: str) -> torch.Tensor:
    """The whole tensor of ``name`` (a key without its layer prefix) from its TP ranks' ``parts``."""
    if len(parts) == 1:
        return parts[0]
    if name.endswith(COLUMN) or name in VOCAB:
        if swiglu and name.startswith("mlp.linear_fc1."):
            halves = [p.chunk(2, dim=0) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(parts, dim=0)
    if name in ROW:
        return torch.cat(parts, dim=1)
    if name in REPLICATED or name.endswith(REPLICATED):
        return parts[0]
    raise UserError(f"{where}: tensor {name!r} of a Megatron-LM legacy 'torch' checkpoint has no known "
                    f"tensor-parallel partition rule here (only dense GPT models are supported)")


def _chunks(sd: dict) -> list:
    if "model" in sd:
        return [sd["model"]]
    keys = sorted((k for k in sd if re.match(r"model\d+$", k)), key=lambda k: int(k[5:]))
    return [sd[k] for k in keys]


def _layer_offsets(args) -> list:
    """``[pp rank][chunk]`` -> (global offset, layers) as megatron-core places them."""
    from megatron_staged.checkpoint.megatron_lm import config_from_megatron_args
    from megatron_staged.config import pipeline_layer_counts

    counts = pipeline_layer_counts(config_from_megatron_args(args))
    pp, vp = len(counts), len(counts[0])
    out = [[None] * vp for _ in range(pp)]
    start = 0
    for v in range(vp):
        for r in range(pp):
            out[r][v] = (start, counts[r][v])
            start += counts[r][v]
    return out


def whole_tensors(ckpt_dir: str, which: str = "model", files: Optional[dict] = None) -> dict:
    """``{global key: whole tensor}``: ``which='model'`` the weights (layers numbered globally,
    ``decoder.layers.<i>.<name>``), or ``'exp_avg'``/``'exp_avg_sq'`` the Adam moments of the same keys."""
    files = files or rank_files(ckpt_dir)
    args = files[(0, 0)]["args"]
    tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
    swiglu = bool(getattr(args, "swiglu", False))
    tied = not getattr(args, "untie_embeddings_and_output_weights", False)
    offsets = _layer_offsets(args)
    local = {}  # global key -> [tp shards]
    for p in range(pp):
        for t in range(tp):
            sd = files[(t, p)]
            chunks = _chunks(sd) if which == "model" else optimizer_chunks(ckpt_dir, sd, (t, p), which)
            if len(chunks) != len(offsets[p]):
                raise UserError(f"{ckpt_dir}: rank TP{t} PP{p} holds {len(chunks)} model chunk(s), its args say "
                                f"{len(offsets[p])}")
            for v, chunk in enumerate(chunks):
                off, n = offsets[p][v]
                for k, val in chunk.items():
                    if not isinstance(val, torch.Tensor) or k.endswith("_extra_state"):
                        continue
                    if k == "output_layer.weight" and tied:
                        continue  # the last stage's copy of the shared embedding (pp > 1)
                    m = _LAYER.match(k)
                    if m:
                        i = int(m.group(1))
                        if i >= n:
                            raise UserError(f"{ckpt_dir}: rank TP{t} PP{p} holds layer {i} in chunk {v}, but its "
                                            f"args place {n} layer(s) there")
                        k = f"decoder.layers.{off + i}.{m.group(2)}"
                    local.setdefault(k, []).append(val)
    out = {}
    for k, parts in local.items():
        m = _LAYER.match(k)
        name = m.group(2) if m else k
        if len(parts) != tp:
            raise UserError(f"{ckpt_dir}: tensor {k} is held by {len(parts)} of the {tp} tensor-parallel ranks")
        out[k] = _merge(name, parts, swiglu, ckpt_dir)
    return out


# the norm names of megatron-core's local spec -> the names this project's models store (fused, as TE)
_FUSED_NORM = {k: v for k, v in NORM_ALIASES.items() if not k.startswith(("self_attention.", "mlp."))}


def global_tensors(ckpt_dir: str, with_optimizer: bool = True) -> dict:
    """The checkpoint's tensors as a torch_dist checkpoint of this project holds them (the keys of
    ``global_tensors.tensor_specs``): layers stacked (``decoder.layers.<name>`` [L, ...]), the local
    spec's norms under the fused names, and (the non-distributed Adam only, when it can be carried)
    ``optimizer.state.{exp_avg,exp_avg_sq[,fp32_param]}.<model key>``. For ``inspect``/``export-hf``."""
    files = rank_files(ckpt_dir)
    kinds = ["model"]
    if with_optimizer and files[(0, 0)].get("optimizer") is not None and \
            not getattr(files[(0, 0)]["args"], "use_distributed_optimizer", False) and \
            optimizer_refusal(ckpt_dir, files) is None:
        kinds += ["exp_avg", "exp_avg_sq"] + (["fp32_param"] if has_masters(files) else [])
    out = {}
    for kind in kinds:
        prefix = "" if kind == "model" else f"optimizer.state.{kind}."
        layers = {}
        for k, v in whole_tensors(ckpt_dir, kind, files).items():
            m = _LAYER.match(k)
            if m is None:
                out[prefix + k] = v
                continue
            name = _FUSED_NORM.get(m.group(2), m.group(2))
            layers.setdefault(name, {})[int(m.group(1))] = v
        for name, by_layer in layers.items():
            out[f"{prefix}decoder.layers.{name}"] = torch.stack([by_layer[i] for i in sorted(by_layer)])
    _load_cached.cache_clear()
    return out


# ---- optimizer ------------------------------------------------------------------------------------

def optimizer_refusal(ckpt_dir: str, files: Optional[dict] = None) -> Optional[str]:
    """Why the checkpoint's optimizer state cannot be carried over (None: it can, or there is none)."""
    files = files or rank_files(ckpt_dir)
    sd = files[(0, 0)]
    args = sd["args"]
    if getattr(args, "no_save_optim", False) or sd.get("optimizer") is None:
        return None
    dist_opt = bool(getattr(args, "use_distributed_optimizer", False))
    if dist_opt:
        dirs = rank_dirs(ckpt_dir)
        missing = [d for d in dirs.values() if not os.path.isfile(os.path.join(d, DIST_OPTIM_FILE))]
        if not missing:
            return None  # megatron-core's own loader reads it, at the saved TP/PP (load_into)
        what = f"the distributed optimizer's state ({os.path.join(missing[0], DIST_OPTIM_FILE)} is missing)"
    elif getattr(args, "fp16", False):
        what = "an fp16 run's optimizer state (its loss scaler)"
    elif getattr(args, "optimizer", "adam") != "adam":
        what = f"{getattr(args, 'optimizer')!r} optimizer state"
    else:
        try:
            for k, f in files.items():
                optimizer_chunks(ckpt_dir, f, k, "exp_avg")
                if "fp32_from_fp16_params" in f["optimizer"]:
                    optimizer_chunks(ckpt_dir, f, k, "fp32_param")
            return None
        except UserError as e:
            what = f"its optimizer state ({e})"
    return what


def _param_names(chunks: list) -> list:
    """Each chunk's parameter names in module order (state_dict order, tensors that are parameters)."""
    return [[k for k, v in c.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
             and v.is_floating_point()] for c in chunks]


def optimizer_chunks(ckpt_dir: str, sd: dict, rank: tuple, kind: str) -> list:
    """One rank's Adam ``kind`` moment (``exp_avg``/``exp_avg_sq``), or with bf16 the fp32 master weights
    (``fp32_param``), as model-like chunk dicts (local keys).

    torch's ``optimizer.state`` is indexed over the param groups' ``params`` in order; megatron-core
    builds the groups from ``named_parameters()`` of every chunk in turn (weight decay first, then
    ``wd_mult 0``: 1-D tensors and biases). bf16's ``Float16OptimizerWithFloat16Params`` wraps that
    state dict (``optimizer``) and lists the fp32 masters per group in the same order
    (``fp32_from_fp16_params``). Each tensor must have its parameter's shape."""
    opt = sd.get("optimizer")
    where = f"{ckpt_dir} rank TP{rank[0]} PP{rank[1]}"
    masters = None
    if isinstance(opt, dict) and "fp32_from_fp16_params" in opt:
        masters, opt = opt["fp32_from_fp16_params"], opt.get("optimizer")
    if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
        raise UserError(f"{where}: optimizer state is not torch's Adam state dict")
    if kind == "fp32_param" and masters is None:
        raise UserError(f"{where}: no fp32 master weights (fp32_from_fp16_params)")
    args = sd["args"]
    chunks = _chunks(sd)
    names = [(ci, n) for ci, ns in enumerate(_param_names(chunks)) for n in ns]
    qk_wd = bool(getattr(args, "apply_wd_to_qk_layernorm", False))

    def no_wd(ci, n):
        t = chunks[ci][n]
        skip = t.dim() == 1 or n.endswith(".bias")
        if qk_wd and ("q_layernorm." in n or "k_layernorm." in n):
            skip = False
        return skip

    order = []
    for gi, g in enumerate(opt["param_groups"]):
        zero = float(g.get("wd_mult", 1.0)) == 0.0
        members = [x for x in names if no_wd(*x) == zero]
        if len(members) != len(g["params"]):
            raise UserError(f"{where}: a param group holds {len(g['params'])} parameters, megatron-core's grouping "
                            f"gives {len(members)}")
        if masters is not None and len(masters[gi]) != len(members):
            raise UserError(f"{where}: fp32_from_fp16_params group {gi} holds {len(masters[gi])} tensors, its "
                            f"param group {len(members)}")
        order += [(idx, gi, j, m) for j, (idx, m) in enumerate(zip(g["params"], members))]
    if len(order) != len(names) or len({o[0] for o in order}) != len(order):
        raise UserError(f"{where}: the param groups do not cover each parameter once")
    out = [dict() for _ in chunks]
    for idx, gi, j, (ci, n) in order:
        if kind == "fp32_param":
            t = masters[gi][j]
        else:
            st = opt["state"].get(idx)
            if st is None or kind not in st:
                raise UserError(f"{where}: no Adam {kind} for parameter {n} (the run saved before its first step?)")
            t = st[kind]
        if tuple(t.shape) != tuple(chunks[ci][n].shape):
            raise UserError(f"{where}: optimizer {kind} {idx} has shape {tuple(t.shape)}, parameter {n} "
                            f"{tuple(chunks[ci][n].shape)}")
        out[ci][n] = t.float()
    return out


def _inner(opt: dict) -> dict:
    return opt["optimizer"] if "fp32_from_fp16_params" in opt else opt


def has_masters(files: dict) -> bool:
    return "fp32_from_fp16_params" in files[(0, 0)]["optimizer"]


def optimizer_step(files: dict) -> int:
    steps = {int(st["step"]) for f in files.values() for st in _inner(f["optimizer"])["state"].values()
             if "step" in st}
    if len(steps) > 1:
        raise UserError(f"the Adam step differs between parameters ({sorted(steps)}); cannot carry the optimizer")
    return steps.pop() if steps else 0


# ---- into built components ----------------------------------------------------------------------

def _stacked_lookup(whole: dict):
    """Look up a sharded key (``decoder.layers.<name>`` stacked over layers, or a per-layer key)."""
    layer_keys = {}
    for k in whole:
        m = _LAYER.match(k)
        if m:
            layer_keys.setdefault(m.group(2), {})[int(m.group(1))] = k

    def get(key: str, layer: Optional[int]):
        if key.startswith("decoder.layers.") and layer is not None:
            name = key[len("decoder.layers."):]
            for n in (name, NORM_ALIASES.get(name)):
                if n in layer_keys and layer in layer_keys[n]:
                    return whole[layer_keys[n][layer]]
            return None
        m = _LAYER.match(key)
        if m and m.group(2) not in layer_keys and NORM_ALIASES.get(m.group(2)):
            key = f"decoder.layers.{m.group(1)}.{NORM_ALIASES[m.group(2)]}"
        return whole.get(key)

    return get


def fill_sharded(sharded_sd: dict, sources: dict, where: str) -> dict:
    """What ``dist_checkpointing.load`` would return for ``sharded_sd`` from a checkpoint holding the
    whole tensors ``sources`` (``{prefix: {model key: tensor}}``; prefix '' for the model,
    ``optimizer.state.exp_avg.`` etc. for the moments)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    sd, nonpersistent, factories = load_preprocess(sharded_sd)
    lookups = {p: _stacked_lookup(w) for p, w in sources.items()}

    def fill(x):
        if isinstance(x, ShardedObject) and x.key.endswith("_extra_state"):
            return x.data  # the module's own (TE's fp8 metadata; None in the local spec)
        if isinstance(x, ShardedObject):
            raise UserError(f"{where}: {x.key} is not part of a Megatron-LM legacy checkpoint's tensors")
        if not isinstance(x, ShardedTensor):
            return x
        prefix = max((p for p in lookups if x.key.startswith(p)), key=len, default=None)
        layer = x.global_offset[0] if x.prepend_axis_num else None
        whole = lookups[prefix](x.key[len(prefix):], layer) if prefix is not None else None
        if whole is None:
            raise UserError(f"{where}: the model needs {x.key!r}, which the Megatron-LM checkpoint does not hold "
                            f"(does the model config match the checkpoint's args?)")
        shape = tuple(x.global_shape[x.prepend_axis_num:])
        if tuple(whole.shape) != shape:
            raise UserError(f"{where}: {x.key} is {tuple(whole.shape)} in the Megatron-LM checkpoint, the model "
                            f"needs {shape}")
        idx = tuple(slice(o, o + s) for o, s in zip(x.global_offset[x.prepend_axis_num:], x.local_shape))
        t = whole[idx]
        if x.flattened_range is not None:
            t = t.flatten()[x.flattened_range]
        return t.to(x.dtype).clone()

    dict_list_map_inplace(fill, sd)
    sd = apply_factory_merges(sd, factories)
    merge(sd, nonpersistent)
    return sd


def _check_dist_layout(ckpt_dir: str, args, optimizer, saved_p: str) -> None:
    """``distrib_optim.pt`` holds megatron-core's flat DDP buffers of one (TP, PP) rank, gathered over DP:
    readable by megatron-core's own loader into the same TP/PP/VP, dtype and buffer layout only."""
    from megatron_staged.checkpoint import manager

    if not manager._is_distributed(optimizer):
        raise UserError(f"{ckpt_dir} was saved with --use-distributed-optimizer (distrib_optim.pt); resume with "
                        f"--use-distributed-optimizer, or pass --no-load-optim to load the weights only")
    lay = manager.current_layout()
    tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None) or None
    now_p = "bf16" if any(p.dtype == torch.bfloat16 for p in _model_params(optimizer)) else "fp32"
    if (tp, pp, vp) != (lay.tp, lay.pp, lay.vp or None) or now_p != saved_p:
        vs, vl = (f" VP{vp}" if vp else ""), (f" VP{lay.vp}" if lay.vp else "")
        raise UserError(f"{ckpt_dir}: Megatron-LM's legacy distributed-optimizer state (distrib_optim.pt, flat "
                        f"buffers) loads only at the saved TP{tp} PP{pp}{vs} in {saved_p} (this run: TP{lay.tp} "
                        f"PP{lay.pp}{vl} in {now_p}); resume at that layout, or first run `torchrun --nproc-per-node "
                        f"{tp * pp} -m megatron_staged convert --load {ckpt_dir} --save NEW` (at the saved layout; it "
                        f"rewrites the optimizer fully reshardable), or pass --no-load-optim (convert: --no-optimizer)")


def _model_params(optimizer):
    for o in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for g in getattr(o, "model_float16_groups", []) + getattr(o, "model_fp32_groups", []):
            yield from g


def _load_dist_optim(ckpt_dir: str, optimizer, step: int) -> None:
    """megatron-core's ``load_parameter_state_from_dp_zero`` on this (TP, PP) rank's ``distrib_optim.pt``
    (read by DP rank 0 with the restricted unpickler; megatron-core scatters it over DP and checks that
    the buffers' sizes match). Adam's step: the iteration (fp32/bf16 skip no step)."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if any(getattr(o, "data_parallel_group_gloo", None) is None for o in parts):
        raise UserError(f"{ckpt_dir}: a legacy --ckpt-format torch distributed-optimizer state is scattered over "
                        f"megatron-core's gloo data-parallel group, which --disable-gloo-process-groups does not "
                        f"create (Megatron-LM asserts --use-dist-ckpt with it too); drop the flag for this load, "
                        f"or convert first (megatron-staged convert), or pass --no-load-optim")
    from megatron.core import parallel_state as ps

    from megatron_staged.checkpoint import manager
    from megatron_staged.checkpoint.safe_load import load_torch_file

    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    path = os.path.join(ckpt_dir, name, DIST_OPTIM_FILE)
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    manager.init_optimizer_state(optimizer)
    state = load_torch_file(path) if ps.get_data_parallel_rank() == 0 else None
    states = state if isinstance(state, list) else [state] * len(parts) if state is None else [state]
    if len(states) != len(parts):
        raise UserError(f"{path} holds {len(states)} optimizer state(s), this run has {len(parts)} optimizer(s)")
    try:
        with torch.no_grad():  # with fp32 params the "main param" is a view of the model's leaf
            for o, st in zip(parts, states):
                for pst in o.optimizer.state.values():
                    pst.pop("step", None)  # torch Adam's per-parameter step is not in the buffers (set below)
                o.load_parameter_state_from_dp_zero(st)
    except AssertionError as e:
        why = str(e).splitlines()[0] if str(e) else "its buffer layout differs"
        raise UserError(f"{path}: megatron-core's loader refused it ({why}); resume with the saved run's DDP "
                        f"bucket settings, or pass --no-load-optim") from None
    manager.set_optimizer_step(optimizer, step)


_RNG_KEYS = ("random_rng_state", "np_rng_state", "torch_rng_state", "rng_tracker_states")


def rng_entry(files: dict, args) -> tuple:
    """(this rank's saved RNG state in Megatron-LM's names, None) or (None, why it is not restored).

    Megatron-LM's ``load_checkpoint``: the state of the rank's own (TP, PP) file, ``rng_state[dp rank]``
    with ``--data-parallel-random-init`` (one entry per DP rank), else ``rng_state[0]``; when the
    (TP, PP) layout differs it ignores the RNG state (as its torch_dist loader does), and a file without
    one (``--no-save-rng``) is ``--no-load-rng``'s case. Here both are a note and a fresh stream."""
    from megatron.core import parallel_state as ps

    from megatron_staged.checkpoint import manager

    lay = manager.current_layout()
    tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None) or None
    if (tp, pp, vp) != (lay.tp, lay.pp, lay.vp or None):
        vs, vl = (f" VP{vp}" if vp else ""), (f" VP{lay.vp}" if lay.vp else "")
        return None, (f"(TP, PP) mismatch after resume (TP{lay.tp} PP{lay.pp}{vl} vs TP{tp} PP{pp}{vs} from "
                      f"checkpoint): RNG state not restored")
    saved = files[(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())].get("rng_state")
    if not isinstance(saved, (list, tuple)) or not saved:
        return None, "no RNG state saved (--no-save-rng?): RNG state not restored"
    dp = ps.get_data_parallel_rank()
    mine = saved[dp] if len(saved) == lay.dp else saved[0]
    if not isinstance(mine, dict) or any(k not in mine for k in _RNG_KEYS) or not mine["rng_tracker_states"]:
        return None, "its RNG state is not in Megatron-LM's rng_state layout: RNG state not restored"
    # the generators' states must be this machine's kind (a CUDA generator's state differs from the CPU's)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    now, saved_t = get_cuda_rng_tracker().get_states(), mine["rng_tracker_states"]
    same = lambda a, b: isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() == b.numel()  # noqa: E731
    if not isinstance(saved_t, dict) or not same(mine["torch_rng_state"], torch.get_rng_state()) or \
            any(not same(saved_t.get(k), v) for k, v in now.items()) or \
            (torch.cuda.is_available() and not same(mine.get("cuda_rng_state"), torch.cuda.get_rng_state())):
        return None, ("its RNG states are of another device's generators (or other tracker streams) than this "
                      "run's: RNG state not restored")
    return mine, None


def load_into(ckpt_dir: str, model_chunks, optimizer, scheduler, *, load_optimizer: bool,
              load_rng: bool = False, rng_note: bool = True) -> dict:
    """``manager.load_checkpoint`` for a legacy checkpoint: weights (and the fp32 Adam state, the
    scheduler) into components built at any layout, and with ``load_rng`` at the saved TP/PP the RNG
    state of each rank's file (:func:`rng_entry`). Returns the train state like it."""
    from megatron_staged.checkpoint import manager
    from megatron_staged.model.builder import unwrap

    common = read_common(ckpt_dir)
    state = dict(common.get("train_state", {}))
    with_optim = load_optimizer and optimizer is not None and state.get("has_optimizer", True)
    if load_optimizer and optimizer is not None and not state.get("has_optimizer", True):
        raise UserError(f"{ckpt_dir} holds no optimizer state (saved with --no-save-optim); "
                        f"load it with --no-load-optim or --finetune")
    if with_optim and common.get("legacy_optimizer_refusal"):
        raise UserError(f"{ckpt_dir}: Megatron-LM legacy 'torch' checkpoint: {common['legacy_optimizer_refusal']} "
                        f"cannot be carried over; load the weights only with --no-load-optim (or --finetune; "
                        f"`megatron-staged convert`: --no-optimizer)")
    files = rank_files(ckpt_dir)
    saved_p = "bf16" if getattr(files[(0, 0)]["args"], "bf16", False) else "fp32"
    dist_saved = bool(getattr(files[(0, 0)]["args"], "use_distributed_optimizer", False))
    if with_optim and dist_saved:
        _check_dist_layout(ckpt_dir, files[(0, 0)]["args"], optimizer, saved_p)
    elif with_optim and (manager._is_distributed(optimizer) or manager._optimizer_precision(optimizer) != saved_p):
        raise UserError(f"{ckpt_dir}: its {saved_p} Adam state (no --use-distributed-optimizer) loads only into a "
                        f"{saved_p} run without --use-distributed-optimizer; resume that way or pass --no-load-optim")
    sources = {"": whole_tensors(ckpt_dir, "model", files)}
    if with_optim and not dist_saved:
        for kind in ("exp_avg", "exp_avg_sq") + (("fp32_param",) if has_masters(files) else ()):
            sources[f"optimizer.state.{kind}."] = whole_tensors(ckpt_dir, kind, files)
    sd = manager.build_state_dict(model_chunks, optimizer, None, {}, is_loading=True,
                                  with_optimizer=with_optim and not dist_saved, with_rng=False)
    loaded = fill_sharded(sd, sources, ckpt_dir)
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(model_chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}"])
    if with_optim and dist_saved:
        _load_dist_optim(ckpt_dir, optimizer, int(common.get("iteration", 0)))
    elif with_optim:
        manager.load_optimizer_state(optimizer, loaded["optimizer"], optimizer_step(files))
    if scheduler is not None and common.get("opt_param_scheduler") is not None and load_optimizer:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    restored = False
    if load_rng:
        from megatron_staged.checkpoint.megatron_lm import from_megatron_rng
        from megatron_staged.runtime.distributed import print_rank0, set_rng_state

        mine, why = rng_entry(files, files[(0, 0)]["args"])
        if mine is not None:
            set_rng_state(from_megatron_rng(mine))
            restored = True
        elif rng_note:
            print_rank0(f"note: {ckpt_dir}: {why} (a fresh stream; pass --no-load-rng to silence this)")
    _load_cached.cache_clear()
    state["iteration"] = common.get("iteration", 0)
    state["args"] = common.get("args")
    state["rng_restored"] = restored
    return state
