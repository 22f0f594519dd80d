"""Checkpoints through megatron-core ``dist_checkpointing`` (torch_dist), in Megatron's layout.

::

    <save>/latest_checkpointed_iteration.txt      "100"
    <save>/iter_0000100/                          .metadata, *.distcp, common.pt, metadata.json

What is saved: the model (``model``), the optimizer in the ``fully_reshardable`` model-space
format (``optimizer``: Adam moments as tensors shaped like their parameters, so TP, PP and DP may
all change on load), the LR scheduler, and a ``train_state`` dict (iteration, consumed samples,
FLOPs so far, optimizer step, stage history), the config tree (``megatron_staged_config``) and the
per-rank RNG. ``common.pt`` and the RNG follow Megatron-LM's ``save_checkpoint`` (``args`` as its
Namespace, the scheduler in samples, content metadata naming the optimizer format), so Megatron-LM
resumes these checkpoints, and checkpoints saved by Megatron-LM load here (``checkpoint.megatron_lm``).

Atomicity: a checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed only after every rank has
finished; ``latest_checkpointed_iteration.txt`` is replaced atomically afterwards. A crash while
saving leaves the previous checkpoint as the latest one, and a stale ``.tmp`` is never loaded.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch
import torch.distributed as dist

from megatron_staged.checkpoint import megatron_lm
from megatron_staged.checkpoint.integrity import write_manifest
from megatron_staged.checkpoint.safe_load import untrusted_checkpoint_reads
from megatron_staged.errors import UserError
from megatron_staged.runtime.distributed import barrier, current_layout, is_rank0, print_rank0, rng_state, set_rng_state

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
# what Megatron-LM's _build_sharded_state_dict_metadata records as the checkpoint's content metadata.
# chained_optim_avoid_prefix: a chain of optimizers (Muon + Adam) then saves its state under the same
# model-space keys as one optimizer (optimizer.state.<kind>.<model key>), not under chained_<i>.
# prefixes that would tie the checkpoint to the chain's order.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def _fixes() -> None:
    from megatron_staged.runtime import megatron_fixes

    megatron_fixes.apply()


def sharding_metadata(sharding_type: str = "fully_reshardable") -> dict:
    """A fresh metadata dict per call: megatron-core stores the current DP group into the dict it
    is given, so a shared one would carry a stale group across a layout change. ``sharding_type``:
    ``dp_reshardable`` only to read a Megatron-LM checkpoint saved in its default form."""
    _fixes()
    return dict(CONTENT_METADATA, distrib_optim_sharding_type=sharding_type)


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under ``root``, or None if there is no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{path} holds {text!r}, not an iteration number; the checkpoint directory is corrupt")


def list_iterations(root: str) -> list[int]:
    """Iterations saved under a --save directory (``iter_XXXXXXX`` directories, not ``.tmp``), ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(n[5:]) for n in os.listdir(root)
                  if n.startswith("iter_") and n[5:].isdigit() and os.path.isdir(os.path.join(root, n)))


def is_checkpoint_root(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRACKER))


def is_iteration_dir(path: str) -> bool:
    from megatron_staged.checkpoint.legacy_torch import is_legacy_dir

    return os.path.isfile(os.path.join(path, "common.pt")) or os.path.isfile(os.path.join(path, ".metadata")) \
        or os.path.isfile(os.path.join(path, "metadata.json")) or is_legacy_dir(path)


def _locate(path: str) -> tuple[str, int]:
    if not os.path.exists(path):
        raise UserError(f"--load {path}: no such directory")
    it = read_tracker(path)
    if it is not None:
        d = iter_dir(path, it) if it > 0 or not os.path.isdir(os.path.join(path, "release")) else os.path.join(path, "release")
        if not os.path.isdir(d):
            tmp = " (only its interrupted save " + os.path.basename(d) + ".tmp exists)" if os.path.isdir(d + ".tmp") else ""
            raise UserError(f"damaged checkpoint: {path}/{TRACKER} names iteration {it} but {d} is missing{tmp}")
        return d, it
    if is_iteration_dir(path):
        base = os.path.basename(os.path.normpath(path))
        it = int(base[5:]) if base.startswith("iter_") and base[5:].isdigit() else 0
        return path, it
    from megatron_staged.checkpoint.integrity import other_format

    other = other_format(path)
    if other:
        raise UserError(other)
    raise UserError(f"--load {path}: not a checkpoint (no {TRACKER} and no iter_XXXXXXX contents); "
                    f"point --load at the directory given to --save")


def resolve_checkpoint_dir(path: str, *, fallback: bool = False) -> tuple[str, int]:
    """Accept a save root (with a tracker file) or one ``iter_XXXXXXX`` directory; check it is intact.

    A damaged checkpoint (missing or truncated files, see ``checkpoint.integrity``) is a one-line
    UserError naming the file. With ``fallback`` and a save root, the newest intact iteration older
    than the damaged one is used instead, with a warning.
    """
    from megatron_staged.checkpoint.integrity import problems

    try:
        ckpt_dir, it = _locate(path)
        found = problems(ckpt_dir)
    except UserError as e:
        if not (fallback and is_checkpoint_root(path) and str(e).startswith("damaged checkpoint")):
            raise
        ckpt_dir, it, found = None, read_tracker(path), [str(e)[len("damaged checkpoint: "):]]
    if not found:
        return ckpt_dir, it
    if not (fallback and is_checkpoint_root(path)):
        hint = "; pass --ckpt-fallback-to-intact to resume from the newest intact one" \
            if is_checkpoint_root(path) and len(list_iterations(path)) > 1 else ""
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"damaged checkpoint: {found[0]}{more}{hint}")
    for older in reversed([i for i in list_iterations(path) if it is None or i < it]):
        d = iter_dir(path, older)
        if not problems(d):
            if is_rank0():
                print(f"warning: the latest checkpoint is damaged ({found[0]}); falling back to the newest "
                      f"intact one, {d} (--ckpt-fallback-to-intact)", file=sys.stderr, flush=True)
            return d, older
    raise UserError(f"damaged checkpoint: {found[0]}; no older intact iteration under {path} to fall back to")


def load_error(ckpt_dir: str, e: BaseException) -> UserError:
    """A one-line UserError for a failed megatron/DCP load: damage, an unsafe pickle, or a mismatch."""
    from megatron_staged.checkpoint.integrity import problems

    from megatron_staged.checkpoint.safe_load import refusal, unsafe_global

    text = f"{e}\n{getattr(e, '__cause__', '') or ''}"
    name = unsafe_global(text)
    if name:
        return refusal(f"an object in {ckpt_dir}", name)
    found = problems(ckpt_dir, checksums=True)
    if found:
        return UserError(f"damaged checkpoint: {found[0]}")
    msg = str(e).strip().splitlines()
    return UserError(f"cannot load checkpoint {ckpt_dir} into this model: {type(e).__name__}: "
                     f"{msg[0] if msg else ''} (does the model config match the checkpoint's?)")


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def describe_contents(path: str) -> str:
    """'holds a checkpoint (iteration 5 of gpt2 4x64)' or 'is not empty (3 entries, e.g. notes.txt)'."""
    if is_checkpoint_root(path) or list_iterations(path):
        it = read_tracker(path) if is_checkpoint_root(path) else list_iterations(path)[-1]
        model = ""
        try:
            from megatron_staged.checkpoint.global_tensors import read_common

            m = (read_common(iter_dir(path, it)).get("args") or {}).get("model") or {}
            model = f" of a {m.get('model_family')} model, {m.get('num_layers')} layers x hidden {m.get('hidden_size')}"
        except UserError:
            pass
        return f"already holds a checkpoint (iteration {it}{model})"
    names = sorted(os.listdir(path))
    return f"is not empty ({len(names)} entr{'y' if len(names) == 1 else 'ies'}, e.g. {names[0]})"


def check_output_dir(path: str, flag: str, *, sources: tuple = (), overwrite: bool = False) -> None:
    """Refuse (one line) to write into a source checkpoint, a file, or a non-empty directory without --overwrite.

    ``sources`` are the iteration directories being read: writing into them or into their save root
    would destroy the input, so that is refused even with --overwrite.
    """
    for src in sources:  # iteration directories being read; their --save root is theirs too
        if src and (_inside(path, src) or os.path.realpath(path) == os.path.realpath(os.path.dirname(os.path.abspath(src)))):
            raise UserError(f"{flag} {path} would write into the source checkpoint {src}; the source is kept: "
                            f"give a new directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserError(f"{flag} {path} {describe_contents(path)}; choose an empty or new directory, or pass "
                        f"--overwrite to replace it")


def clear_checkpoint_root(root: str) -> None:
    """For --overwrite: remove the tracker and iteration directories of the checkpoint at ``root`` (rank 0)."""
    if not is_rank0() or not os.path.isdir(root):
        return
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if name == TRACKER or (name.startswith("iter_") and os.path.isdir(p)):
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def load_common(ckpt_dir: str) -> dict:
    """The non-sharded part (``common.pt``): args, iteration, train_state, scheduler, layout
    (normalised: ``args`` is the config tree, the scheduler counts iterations; see ``read_common``).

    Read with ``torch.load(weights_only=True)``: a checkpoint's pickle runs no code.
    """
    from megatron_staged.checkpoint.global_tensors import read_common

    return read_common(ckpt_dir)


# ---- sharded state dict -------------------------------------------------------------------------

def model_sharded_state_dict(model_chunks) -> dict:
    from megatron_staged.model.builder import unwrap

    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict(metadata=sharding_metadata())}
    return {f"model{i}": unwrap(c).sharded_state_dict(metadata=sharding_metadata()) for i, c in enumerate(model_chunks)}


def _rng_sharded_object(layout: str = "megatron"):
    """The RNG state as Megatron-LM saves it: a ShardedObject over (PP, TP), replicated over DP,
    holding the list of every DP rank's state under Megatron-LM's names (what it writes with
    ``--data-parallel-random-init``; without that flag it reads entry 0). ``layout='legacy'``: the
    (PP, TP, DP) object of checkpoints saved here before (reading only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    lay = current_layout()
    pp_rank, tp_rank, dp_rank = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                                 ps.get_data_parallel_rank())
    if layout == "legacy":
        return ShardedObject("rng_state", plain_rng_state(rng_state()), (lay.pp, lay.tp, lay.dp),
                             (pp_rank, tp_rank, dp_rank), replica_id=0)
    states = [megatron_lm.to_megatron_rng(rng_state())]
    if dist.is_initialized() and lay.dp > 1:
        states = [None] * lay.dp
        dist.all_gather_object(states, megatron_lm.to_megatron_rng(rng_state()), group=ps.get_data_parallel_group())
    return ShardedObject("rng_state", states, (lay.pp, lay.tp), (pp_rank, tp_rank), replica_id=dp_rank)


def _restore_rng(loaded, layout: str) -> None:
    from megatron.core import parallel_state as ps

    if layout == "legacy":
        set_rng_state(rng_state_from_plain(loaded))
        return
    mine = loaded[ps.get_data_parallel_rank()] if len(loaded) == current_layout().dp else loaded[0]
    set_rng_state(megatron_lm.from_megatron_rng(mine))


def plain_rng_state(state: dict) -> dict:
    """The RNG state with numpy's key array as a list (the legacy layout's form)."""
    kind, keys, pos, has_gauss, cached = state["np"]
    return dict(state, np=[kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)])


def rng_state_from_plain(state: dict) -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = state["np"]
    return dict(state, np=(kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def build_state_dict(model_chunks, optimizer, scheduler, common: dict, *, is_loading: bool,
                     with_optimizer: bool, with_rng: bool, optim_sharding: str = "fully_reshardable",
                     rng_layout: str = "megatron") -> dict:
    """``scheduler`` (saving only) is stored as is; :func:`save_checkpoint` puts it in ``common``
    in Megatron-LM's units instead."""
    sd = dict(common)
    model_sd = model_sharded_state_dict(model_chunks)
    sd.update(model_sd)
    if with_optimizer and optimizer is not None:
        # one chunk: its dict; several (interleaved 1F1B): the nested {"model0": ..., "model1": ...}, as
        # Megatron-LM passes it (the chunks' local keys coincide, so a flat merge would lose chunks)
        merged = model_sd["model"] if len(model_sd) == 1 else model_sd
        sd["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading,
                                                       metadata=sharding_metadata(optim_sharding))
    if scheduler is not None and not is_loading:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _rng_sharded_object(rng_layout)
    return sd


# ---- optimizer "step" -------------------------------------------------------------------------
# torch's Adam keeps a per-parameter "step"; megatron's fully_reshardable format does not store it
# per parameter (and its loader trips over it), so the step lives in train_state and is re-set here.

def _inner_optimizers(optimizer):
    opts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in opts]


def init_optimizer_state(optimizer, zero: bool = True) -> None:
    """Create the moments (zeros) and step=0, so that state_dict()/sharded_state_dict() work before
    step 1. ``zero=False``: torch Adam's moments are allocated and left unwritten (no memory is
    committed until a caller writes them: a growth fills every element)."""
    for o in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(o, "optimizer", o)
        if not zero and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    if len(inner.state[p]) == 0:
                        inner.state[p]["exp_avg"] = torch.empty_like(p.data)
                        inner.state[p]["exp_avg_sq"] = torch.empty_like(p.data)
            continue
        fn = getattr(o, "init_state_fn", None)
        if fn is not None:
            fn(o.optimizer, getattr(o, "config", None))
    set_optimizer_step(optimizer, get_optimizer_step(optimizer))


def step_lives_in_param_groups(inner) -> bool:
    """Fused Adams (Transformer Engine's and apex's ``FusedAdam``) keep one ``step`` per param group
    (``group['step']``, the bias-correction count); torch's Adam/AdamW keep one per parameter."""
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    return "Adam" in type(inner).__name__ or any("step" in g for g in inner.param_groups)


def get_optimizer_step(optimizer) -> int:
    """The optimizer's step count (Adam's bias-correction step), wherever this optimizer keeps it.

    Collective for ``dist_muon`` (megatron's LayerWiseDistributedOptimizer): a DP rank may hold no
    Adam parameter, hence no step, so the largest over the ranks is taken.
    """
    step = _local_optimizer_step(optimizer)
    if hasattr(optimizer, "dp_cp_params_list"):  # LayerWiseDistributedOptimizer
        from megatron_staged.runtime.distributed import all_reduce_scalar

        step = int(all_reduce_scalar(step, "max"))
    return step


def _local_optimizer_step(optimizer) -> int:
    for inner in _inner_optimizers(optimizer):
        if step_lives_in_param_groups(inner):
            # TE's FusedAdam does not count steps of empty groups (megatron aligns them on save)
            steps = [int(g["step"]) for g in inner.param_groups if "step" in g and g.get("params")]
            if steps:
                return max(steps)
        else:
            # only Adam's: megatron's loader also gives Muon's states a "step" (its common_step),
            # which Muon never advances
            for st in inner.state.values():
                if "step" in st and "exp_avg" in st:
                    return int(st["step"])
    return 0


def set_optimizer_step(optimizer, step: int) -> None:
    """Set the step count everywhere this optimizer keeps it (per parameter or per param group)."""
    for inner in _inner_optimizers(optimizer):
        if step_lives_in_param_groups(inner):
            for group in inner.param_groups:
                old = group.get("step")
                group["step"] = torch.full_like(old, step) if torch.is_tensor(old) else int(step)
            continue
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "exp_avg" in st:
                    old = st.get("step")
                    device = old.device if torch.is_tensor(old) else None  # capturable/fused: on the device
                    st["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


def _optimizer_precision(optimizer) -> str:
    """bf16, fp16 or fp32: the model precision megatron-core built this (non-distributed) optimizer for."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in parts:
        if hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
            dtypes = {p.dtype for g in opt.float16_groups for p in g}
            return "fp16" if torch.float16 in dtypes else "bf16"
    return "fp32"


def load_optimizer_state(optimizer, sd: dict, step: int) -> None:
    """``optimizer.load_state_dict`` for a loaded sharded state dict, with torch Adam's step.

    The distributed optimizer's fully_reshardable loader copies every key of a parameter's state
    from the checkpoint, ``step`` included, which the format does not hold per parameter. So the
    parameter state is loaded separately, with ``step`` removed, and the step is re-set after.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    sds = [sd] if len(parts) == 1 else [sd[i] for i in range(len(parts))]
    for opt, part_sd in zip(parts, sds):
        param_state = None
        if isinstance(part_sd.get("fp32_from_fp16_params"), dict):
            # dist_muon (megatron's LayerWiseDistributedOptimizer) saves this list as {index: group}
            groups = part_sd["fp32_from_fp16_params"]
            part_sd = dict(part_sd, fp32_from_fp16_params=[groups[k] for k in sorted(groups)])
        if isinstance(opt, DistributedOptimizer) and "param_state" in part_sd:
            part_sd = dict(part_sd)
            kind = part_sd["param_state_sharding_type"]
            if kind == "dp_reshardable":  # Megatron-LM's default: megatron-core's own loader (same TP/PP)
                with torch.no_grad():  # with fp32 params the "main param" is a view of the model's leaf
                    opt.load_state_dict(part_sd)
                continue
            param_state = part_sd.pop("param_state")
            part_sd.pop("param_state_sharding_type")
            if kind != "fully_reshardable":
                raise UserError(f"optimizer state saved as {kind!r}; this loader reads 'fully_reshardable' "
                                f"and Megatron-LM's 'dp_reshardable'")
        elif isinstance(part_sd.get("state"), dict) and "common_step" not in part_sd["state"]:
            # megatron drops a falsy step (0) when saving (`if step:`), and torch's Adam then
            # refuses a state without "step": supply it
            part_sd = dict(part_sd, state=dict(part_sd["state"], common_step=torch.tensor(float(step))))
        elif isinstance(part_sd.get("optimizer"), dict) and isinstance(part_sd["optimizer"].get("state"), dict) \
                and "common_step" not in part_sd["optimizer"]["state"]:
            # the same inside bf16/fp16's Float16OptimizerWithFloat16Params ({"optimizer": torch's, ...}); a
            # growth's target state has step 0 until the step is set below
            inner_sd = part_sd["optimizer"]
            part_sd = dict(part_sd, optimizer=dict(inner_sd, state=dict(inner_sd["state"],
                                                                          common_step=torch.tensor(float(step)))))
        opt.load_state_dict(part_sd)
        if param_state is not None:
            for st in opt.optimizer.state.values():
                st.pop("step", None)
            opt.load_parameter_state_from_fully_reshardable(param_state)
    set_optimizer_step(optimizer, step)


# ---- save / load ------------------------------------------------------------------------------

def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler, train_state: dict,
                    args: dict, *, save_optimizer: bool = True, replace_existing: bool = False) -> str:
    """Save atomically to ``root/iter_XXXXXXX``; returns that path.

    ``replace_existing`` (the tools' --overwrite) first removes any other checkpoint under ``root``,
    so that one tracker never covers two runs' iterations.
    """
    from megatron.core import dist_checkpointing

    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if replace_existing:
        clear_checkpoint_root(root)
    if is_rank0():
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    from megatron_staged.config import Config

    lay = current_layout()
    has_optimizer = bool(save_optimizer and optimizer is not None)
    state = dict(train_state, optimizer_step=get_optimizer_step(optimizer) if optimizer is not None else 0,
                 has_optimizer=has_optimizer)
    mlm_args = megatron_lm.megatron_lm_args(
        Config.from_dict(args), tp=lay.tp, pp=lay.pp, world_size=lay.tp * lay.pp * lay.dp, iteration=iteration,
        consumed_train_samples=int(state.get("consumed_train_samples", 0)), has_optimizer=has_optimizer)
    common = {
        "args": mlm_args,  # Megatron-LM's form (its load_checkpoint reads attributes)
        megatron_lm.CONFIG_KEY: args,
        "iteration": iteration,
        "checkpoint_version": CHECKPOINT_VERSION,
        "train_state": state,
        "num_floating_point_operations_so_far": state.get("flops_so_far", 0.0),
        "parallel_layout": lay.as_dict(),
    }
    if scheduler is not None:
        common["opt_param_scheduler"] = megatron_lm.scheduler_in_samples(scheduler.state_dict(),
                                                                         mlm_args.global_batch_size)
    fresh = {}
    if save_optimizer and optimizer is not None:  # a growth's fresh-moment masks, inside its correction window
        from megatron_staged.growth import fresh_moments

        fresh, start = fresh_moments.save_tensors(optimizer, model_sharded_state_dict(model_chunks))
        if fresh:
            common["fresh_moments"] = {"start_step": start}
    sd = build_state_dict(model_chunks, optimizer, None, common, is_loading=False,
                          with_optimizer=save_optimizer, with_rng=True)
    if fresh:
        sd["fresh_moment_masks"] = fresh
    content = dict(CONTENT_METADATA)
    if has_optimizer and _is_distributed(optimizer):
        content.update(distrib_optim_sharding_type="fully_reshardable",
                       distrib_optim_fully_reshardable_mem_efficient=False)
    dist_checkpointing.save(sd, tmp, validate_access_integrity=True, content_metadata=content)
    _fault_injection("save", iteration)
    barrier()
    write_manifest(tmp)  # sizes + checksums, before the rename makes the checkpoint visible
    barrier()
    if is_rank0():
        if os.path.exists(final):
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _write_tracker(root, iteration)
    barrier()
    return final


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return isinstance(parts[0], DistributedOptimizer)


def _fault_injection(point: str, iteration: int) -> None:
    """Die here if MEGATRON_STAGED_FAULT=point:iteration (used by the crash-safety tests)."""
    if os.environ.get("MEGATRON_STAGED_FAULT") == f"{point}:{iteration}":
        os._exit(17)


def _write_tracker(root: str, iteration: int) -> None:
    path = os.path.join(root, TRACKER)
    with open(path + ".tmp", "w") as fh:
        fh.write(str(iteration))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".tmp", path)


def _optimizer_sharding(common: dict, ckpt_dir: str, optimizer) -> str:
    """The distributed optimizer's sharding type in the checkpoint; dp_reshardable needs the same TP/PP."""
    kind = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type") or "fully_reshardable"
    if kind == "fully_reshardable" or not _is_distributed(optimizer):
        return "fully_reshardable"
    if kind != "dp_reshardable":
        raise UserError(f"{ckpt_dir}: optimizer saved in Megatron-LM's {kind!r} form, which this project does not "
                        f"read; resave it with Megatron-LM using --dist-ckpt-optim-fully-reshardable, or pass "
                        f"--no-load-optim")
    saved, lay = common.get("parallel_layout") or {}, current_layout()
    if (saved.get("tp"), saved.get("pp"), saved.get("vp")) != (lay.tp, lay.pp, lay.vp):
        vp_s, vp_l = (f" VP{saved['vp']}" if saved.get("vp") else ""), (f" VP{lay.vp}" if lay.vp else "")
        raise UserError(f"{ckpt_dir}: Megatron-LM saved its distributed optimizer as 'dp_reshardable' (its default), "
                        f"which loads only at the saved TP{saved.get('tp')} PP{saved.get('pp')}{vp_s} (this run: "
                        f"TP{lay.tp} PP{lay.pp}{vp_l}); resume at that layout, or first run `megatron-staged convert --load {ckpt_dir} "
                        f"--save NEW` (at the saved layout; it rewrites the optimizer fully reshardable), or pass "
                        f"--no-load-optim")
    return kind


def saved_optimizer_form(common: dict) -> tuple[str, str]:
    """(``distributed`` or ``plain``, the model precision) a checkpoint's optimizer was saved for
    (``any`` for the distributed optimizer, as in :func:`optimizer_form`)."""
    config = common.get("args") or {}
    dist_opt = bool(config.get("parallel", {}).get("use_distributed_optimizer", False))
    if dist_opt:  # the same state in every precision (see optimizer_form)
        return "distributed", "any"
    m = config.get("model", {})
    return "plain", ("bf16" if m.get("bf16") else "fp16" if m.get("fp16") else "fp32")


def optimizer_form(optimizer) -> tuple[str, str]:
    """(``distributed`` or ``plain``, the model precision) of a built optimizer. The distributed
    optimizer's state is the same in every precision (``param``: the fp32 master), so its precision
    is reported as ``any``; megatron-core's non-distributed optimizers differ by precision (an fp32
    master copy, ``fp32_param``, in 16-bit runs only)."""
    if _is_distributed(optimizer):
        return "distributed", "any"
    return "plain", _optimizer_precision(optimizer)


def _check_switchable(common: dict, ckpt_dir: str) -> None:
    """A distributed optimizer's state is read into the other optimizer kind from its model-space
    (``fully_reshardable``) form only; Megatron-LM's default flat-bucket form is refused."""
    kind = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type") or "fully_reshardable"
    if kind != "fully_reshardable":
        raise UserError(f"{ckpt_dir} was saved with --use-distributed-optimizer in Megatron-LM's {kind!r} form "
                        f"(flat buckets), which loads only into the distributed optimizer: resume with "
                        f"--use-distributed-optimizer (at the saved TP/PP), or first run `megatron-staged convert "
                        f"--load {ckpt_dir} --save NEW` (it rewrites the optimizer fully reshardable; add "
                        f"--no-use-distributed-optimizer to switch there), or pass --no-load-optim to start a "
                        f"fresh optimizer")


def _translate_keys(sharded_sd, available: set, ckpt_dir: str, masters_only: bool = False) -> None:
    """Point each ShardedTensor (or factory) of ``sharded_sd`` at the key under which the checkpoint
    holds its values in the other optimizer kind's form (:func:`global_tensors.saved_key`), in
    place. An optimizer's state dict (``masters_only`` False): its plain entries (param groups,
    the sharding type) are wrapped so that the load hands back this optimizer's own, not the
    checkpoint's (they are another optimizer's). ``masters_only``: a model state dict, whose
    weights are read from the fp32 masters where the checkpoint holds them."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    from megatron_staged.checkpoint.global_tensors import STATE_PREFIX, saved_key

    def fix(v):
        if isinstance(v, ShardedBase) and hasattr(v, "key"):
            if masters_only:
                key = saved_key("param", v.key, available)
                return v if key is None or key == v.key else replace(v, key=key)
            if not v.key.startswith(STATE_PREFIX):
                return v
            kind, model_key = v.key[len(STATE_PREFIX):].split(".", 1)
            key = saved_key(kind, model_key, available)
            if key is None:
                raise UserError(f"{ckpt_dir} holds no {kind} state for {model_key} (in either optimizer's form); "
                                f"pass --no-load-optim to start a fresh optimizer")
            return v if key == v.key else replace(v, key=key)
        if masters_only or isinstance(v, LocalNonpersistentObject):
            return v
        return LocalNonpersistentObject(v)

    dict_list_map_inplace(fix, sharded_sd)


def _load_translated_optimizer(model_chunks, optimizer, common: dict, ckpt_dir: str, available: set):
    """This optimizer's sharded state dict, filled from a checkpoint saved by the other optimizer
    kind (or, non-distributed, in another precision): the same model-space tensors under that
    form's keys (``exp_avg``/``exp_avg_sq`` alike; the fp32 master as ``param``, ``fp32_param`` or
    the fp32 model weight). The step comes from ``train_state`` (:func:`load_optimizer_state`), the
    loss scaler from the checkpoint when both runs have one."""
    from megatron.core import dist_checkpointing

    model_sd = model_sharded_state_dict(model_chunks)
    merged = model_sd["model"] if len(model_sd) == 1 else model_sd
    opt_sd = optimizer.sharded_state_dict(merged, is_loading=True, metadata=sharding_metadata())
    _translate_keys(opt_sd, available, ckpt_dir)
    key = "optimizer_translated"  # not "optimizer": the load would merge in the checkpoint's own entries
    try:
        with untrusted_checkpoint_reads():
            loaded = dist_checkpointing.load({key: opt_sd}, ckpt_dir, strict="assume_ok_unexpected")
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise load_error(ckpt_dir, e) from None
    out = loaded[key]
    saved = common.get("optimizer")
    if isinstance(out, dict) and "grad_scaler" in out and isinstance(saved, dict) and "grad_scaler" in saved:
        out["grad_scaler"] = saved["grad_scaler"]  # fp16: the loss scale and its growth tracker
    return out


def _saved_param_groups(saved) -> list:
    """The param groups (hyperparameters) in a checkpoint's common optimizer entry, of either form."""
    if isinstance(saved, dict):
        if isinstance(saved.get("param_groups"), list):
            return saved["param_groups"]
        return _saved_param_groups(saved.get("optimizer"))
    return []


def _carry_param_groups(optimizer, saved) -> None:
    """The hyperparameters a resume takes from its checkpoint (Megatron's rule: the saved max/min LR,
    betas, weight decay, ...), group kind by group kind, when the optimizer was rebuilt in the
    other form (whose plain entries were not loaded)."""
    from megatron_staged.growth.apply import group_key

    by_kind = {group_key(g): g for g in _saved_param_groups(saved) if isinstance(g, dict)}
    for g in getattr(optimizer, "param_groups", None) or []:
        old = by_kind.get(group_key(g))
        if old is not None:
            g.update({k: v for k, v in old.items() if k not in ("params", "step") and k in g})


def _model_layout_str(lay: dict) -> str:
    """``TPt PPp[ VPv]`` of a ``parallel_layout`` dict (DP left out: the RNG streams do not depend on it)."""
    return f"TP{lay.get('tp')} PP{lay.get('pp')}" + (f" VP{lay['vp']}" if lay.get("vp") else "")


def load_checkpoint(path: str, model_chunks, optimizer, scheduler, *, load_optimizer: bool = True,
                    load_rng: bool = True, rng_note: bool = True) -> dict:
    """Load into already-built model/optimizer/scheduler at the current layout.

    Returns the checkpoint's ``train_state`` (with ``iteration`` and ``args``, the config tree as a
    dict). The layout may differ from the one saved: weights and moments are resharded by
    dist_checkpointing; the RNG state is restored at the saved TP/PP/VP (any DP, as Megatron-LM reads
    its per-DP list at entry 0), else not (its per-rank streams do not map across layouts; a note,
    as Megatron-LM's, unless ``rng_note`` is False). Checkpoints saved by Megatron-LM load the same way (``checkpoint.megatron_lm``); its
    default ``dp_reshardable`` optimizer form needs the saved TP/PP, as in Megatron-LM.

    The optimizer kind and, without the distributed optimizer, the precision may differ from the
    saved ones too: this optimizer's sharded state dict is then loaded through the saved form's
    model-space keys (:func:`_load_translated_optimizer`), so moments, fp32 masters and the step
    carry over; only Megatron-LM's ``dp_reshardable`` form into a run without the distributed
    optimizer is refused.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir, _ = resolve_checkpoint_dir(path)
    from megatron_staged.checkpoint import legacy_torch

    if legacy_torch.is_legacy_dir(ckpt_dir):  # Megatron-LM's --ckpt-format torch: read directly, any layout
        return legacy_torch.load_into(ckpt_dir, model_chunks, optimizer, scheduler, load_optimizer=load_optimizer,
                                      load_rng=load_rng, rng_note=rng_note)
    common = load_common(ckpt_dir)
    state = dict(common.get("train_state", {}))
    config = common.get("args")
    lay = current_layout()
    saved_lay = common.get("parallel_layout", {})
    # the RNG streams are per (TP, PP) rank (VP too: its chunks hold other layers); DP ranks share them
    # unless --data-parallel-random-init, whose per-DP list Megatron-LM reads at entry 0 when DP differs
    same_model_layout = {k: v for k, v in saved_lay.items() if k != "dp"} == \
        {k: v for k, v in lay.as_dict().items() if k != "dp"}
    with_optim = load_optimizer and optimizer is not None and state.get("has_optimizer", True)
    if load_optimizer and optimizer is not None and not state.get("has_optimizer", True):
        raise UserError(f"{ckpt_dir} holds no optimizer state (saved with --no-save-optim); "
                        f"load it with --no-load-optim or --finetune")
    optim_sharding = "fully_reshardable"
    switch = None  # (saved form, this run's form) when the optimizer state is translated on load
    if with_optim:
        saved_form, now_form = saved_optimizer_form(common), optimizer_form(optimizer)
        if saved_form != now_form:
            if saved_form[0] == "distributed":
                _check_switchable(common, ckpt_dir)
            switch = (saved_form, now_form)
        else:
            optim_sharding = _optimizer_sharding(common, ckpt_dir, optimizer)
    rng_layout = None
    if load_rng:
        rng_layout = megatron_lm.rng_layout(ckpt_dir)
        if rng_layout == "legacy" and saved_lay.get("dp") != lay.dp:
            rng_layout = None  # checkpoints saved here before kept one object per (PP, TP, DP) rank
        elif rng_layout is not None and not same_model_layout:
            if rng_note:
                print_rank0(f"note: {ckpt_dir}: (TP, PP) mismatch after resume ({_model_layout_str(lay.as_dict())} vs "
                            f"{_model_layout_str(saved_lay)} "
                            f"from checkpoint): RNG state not restored (a fresh stream from --seed; "
                            f"--no-load-rng silences this)")
            rng_layout = None
    sd = build_state_dict(model_chunks, optimizer, None, {}, is_loading=True,
                          with_optimizer=with_optim and switch is None, with_rng=rng_layout is not None,
                          optim_sharding=optim_sharding, rng_layout=rng_layout or "megatron")
    available = None
    if switch is not None:
        from megatron_staged.checkpoint.global_tensors import tensor_specs

        available = set(tensor_specs(ckpt_dir))
        if switch[1] == ("plain", "fp32"):
            # no master copy in this optimizer: the model weight is the master, so it is read from the
            # checkpoint's fp32 master where there is one (a 16-bit run's), not from the rounded weight
            for k in [k for k in sd if k == "model" or (k.startswith("model") and k[5:].isdigit())]:
                _translate_keys(sd[k], available, ckpt_dir, masters_only=True)
    fresh = (common.get("fresh_moments") or {}) if with_optim else {}
    if fresh:
        from megatron_staged.growth import fresh_moments

        fresh_model_sd = model_sharded_state_dict(model_chunks)
        sd["fresh_moment_masks"] = fresh_moments.load_templates(fresh_model_sd)
    try:
        with untrusted_checkpoint_reads():
            loaded = dist_checkpointing.load(sd, ckpt_dir, strict="assume_ok_unexpected")
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise load_error(ckpt_dir, e) from None
    from megatron_staged.model.builder import unwrap

    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(model_chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}"])
    if with_optim:
        if switch is not None:
            loaded["optimizer"] = _load_translated_optimizer(model_chunks, optimizer, common, ckpt_dir, available)
        load_optimizer_state(optimizer, loaded["optimizer"], state.get("optimizer_step", 0))
        if switch is not None:
            _carry_param_groups(optimizer, common.get("optimizer"))
        if fresh:
            fresh_moments.loaded_tensors(optimizer, fresh_model_sd, loaded["fresh_moment_masks"], fresh["start_step"])
    if scheduler is not None and common.get("opt_param_scheduler") is not None and load_optimizer:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if rng_layout is not None and "rng_state" in loaded:
        _restore_rng(loaded["rng_state"], rng_layout)
    state["iteration"] = common.get("iteration", 0)
    state["args"] = config
    state["rng_restored"] = rng_layout is not None
    return state
