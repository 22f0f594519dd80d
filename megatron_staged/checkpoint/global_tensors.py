"""Read a checkpoint's *global* tensors in one plain process (no torchrun, no model, no megatron).

A torch_dist checkpoint directory (``iter_XXXXXXX/``) holds torch DCP files: ``.metadata`` lists
every tensor by its global key with its global shape and dtype, and the ``*.distcp`` files hold
the shards each rank wrote. ``torch.distributed.checkpoint.load`` with ``no_dist=True`` assembles
whole tensors from those shards, whatever layout they were saved at.

Keys are megatron-core's: ``embedding.word_embeddings.weight`` [padded_V, h],
``decoder.layers.<param>`` stacked over layers [L, ...], ``decoder.final_layernorm.weight``,
``output_layer.weight``; optimizer moments in model space under
``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``. Non-tensor entries (``_extra_state``,
``rng_state``) are byte objects and are skipped here.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional

import torch

from megatron_staged.checkpoint.safe_load import load_dcp_metadata, load_torch_file, untrusted_checkpoint_reads
from megatron_staged.errors import UserError

OPTIMIZER_PREFIX = "optimizer."
STATE_PREFIX = "optimizer.state."
# the fp32 master weight: the distributed optimizer's ``param`` (fp32 and 16-bit runs alike), the
# non-distributed 16-bit optimizer's ``fp32_param``; a non-distributed fp32 optimizer keeps none
# (its model weight is the master)
MASTER_KINDS = ("param", "fp32_param")


def saved_key(kind: str, model_key: str, available) -> Optional[str]:
    """The key under which a checkpoint of either optimizer kind holds state ``kind`` of parameter
    ``model_key``, or None. ``kind`` ``param`` (or ``fp32_param``): the fp32 master, else the model
    weight itself (which is the master when saved in fp32 without the distributed optimizer);
    ``exp_avg``/``exp_avg_sq`` and any other state: the same key in both optimizers' formats."""
    if kind in MASTER_KINDS:
        for k in (f"{STATE_PREFIX}param.{model_key}", f"{STATE_PREFIX}fp32_param.{model_key}", model_key):
            if k in available:
                return k
        return None
    k = f"{STATE_PREFIX}{kind}.{model_key}"
    return k if k in available else None


def read_common(ckpt_dir: str) -> dict:
    """``common.pt`` (args, iteration, train_state, scheduler, layout) without importing megatron,
    normalised by :func:`megatron_staged.checkpoint.megatron_lm.normalize_common` (``args`` is always the
    config tree as a dict, also for checkpoints saved by Megatron-LM)."""
    path = os.path.join(ckpt_dir, "common.pt")
    from megatron_staged.checkpoint import legacy_torch

    if not os.path.isfile(path) and legacy_torch.is_legacy_dir(ckpt_dir):
        return legacy_torch.read_common(ckpt_dir)  # Megatron-LM's --ckpt-format torch (mp_rank_*/)
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir} has no common.pt; it is not a complete torch_dist checkpoint "
                        f"(was the save interrupted? point at a directory listed by "
                        f"latest_checkpointed_iteration.txt)")
    common = load_torch_file(path)  # weights_only: a checkpoint's pickle runs no code
    if not isinstance(common, dict):
        raise UserError(f"{path} holds a {type(common).__name__}, not a checkpoint's common state dict")
    from megatron_staged.checkpoint.megatron_lm import normalize_common

    return normalize_common(common)  # Megatron-LM's and ours alike: args = the config tree


def read_metadata(ckpt_dir: str):
    """The torch DCP ``Metadata`` of a checkpoint directory (torch_dist only)."""
    from megatron_staged.checkpoint import legacy_torch

    if not os.path.isfile(os.path.join(ckpt_dir, ".metadata")) and legacy_torch.is_legacy_dir(ckpt_dir):
        raise UserError(f"{ckpt_dir} is a Megatron-LM checkpoint in the legacy 'torch' format, which has no DCP "
                        f"metadata; convert it first: megatron-staged convert --load {ckpt_dir} --save NEW")
    return load_dcp_metadata(ckpt_dir)  # restricted unpickler: DCP's metadata classes only


def _legacy(ckpt_dir: str) -> bool:
    """Megatron-LM's legacy ``--ckpt-format torch`` (``mp_rank_*/model_optim_rng.pt``): read through
    ``legacy_torch.global_tensors`` (the rank files loaded and merged; the same keys as torch_dist)."""
    from megatron_staged.checkpoint import legacy_torch

    return not os.path.isfile(os.path.join(ckpt_dir, ".metadata")) and legacy_torch.is_legacy_dir(ckpt_dir)


def tensor_specs(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor in the checkpoint: ``{global key: (global shape, dtype)}`` in file order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if _legacy(ckpt_dir):
        from megatron_staged.checkpoint.legacy_torch import global_tensors

        return {k: (tuple(v.shape), v.dtype) for k, v in global_tensors(ckpt_dir).items()}
    md = read_metadata(ckpt_dir)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def is_model_key(key: str) -> bool:
    return not key.startswith(OPTIMIZER_PREFIX)


def read_global_tensors(ckpt_dir: str, keys: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Whole (global) tensors by key, assembled from all ranks' shards; all tensors if ``keys`` is None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    if _legacy(ckpt_dir):
        from megatron_staged.checkpoint.legacy_torch import global_tensors

        with_opt = keys is None or any(not is_model_key(k) for k in keys)
        whole = global_tensors(ckpt_dir, with_optimizer=with_opt)
        keys = list(whole) if keys is None else list(keys)
        missing = [k for k in keys if k not in whole]
        if missing:
            raise UserError(f"{ckpt_dir} holds no tensor {missing[0]!r}; run `megatron-staged inspect` on it "
                            f"to list what it holds")
        return {k: whole[k] for k in keys}
    specs = tensor_specs(ckpt_dir)
    keys = list(specs) if keys is None else list(keys)
    missing = [k for k in keys if k not in specs]
    if missing:
        raise UserError(f"{ckpt_dir} holds no tensor {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; run `megatron-staged inspect` on it to list what it holds")
    sd = {k: torch.empty(specs[k][0], dtype=specs[k][1]) for k in keys}
    with warnings.catch_warnings(), untrusted_checkpoint_reads():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(sd, storage_reader=FileSystemReader(ckpt_dir), no_dist=True)
    return sd


def read_model_tensors(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The model's global tensors (no optimizer state)."""
    if _legacy(ckpt_dir):
        from megatron_staged.checkpoint.legacy_torch import global_tensors

        return global_tensors(ckpt_dir, with_optimizer=False)
    return read_global_tensors(ckpt_dir, [k for k in tensor_specs(ckpt_dir) if is_model_key(k)])
