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

from megatron_staged.errors import UserError

OPTIMIZER_PREFIX = "optimizer."


def read_common(ckpt_dir: str) -> dict:
    """``common.pt`` (args, iteration, train_state, scheduler, layout) without importing megatron."""
    path = os.path.join(ckpt_dir, "common.pt")
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir} has no common.pt; it is not a complete torch_dist checkpoint "
                        f"(was the save interrupted? point at a directory listed by "
                        f"latest_checkpointed_iteration.txt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure as bad input
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}")


def read_metadata(ckpt_dir: str):
    """The torch DCP ``Metadata`` of a checkpoint directory."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(ckpt_dir).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read the DCP metadata of {ckpt_dir} ({type(e).__name__}: {e}); "
                        f"is it a torch_dist checkpoint directory (with a .metadata file)?")


def tensor_specs(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor in the checkpoint: ``{global key: (global shape, dtype)}`` in file order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_metadata(ckpt_dir)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def is_model_key(key: str) -> bool:
    return not key.startswith(OPTIMIZER_PREFIX)


def read_global_tensors(ckpt_dir: str, keys: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Whole (global) tensors by key, assembled from all ranks' shards; all tensors if ``keys`` is None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    specs = tensor_specs(ckpt_dir)
    keys = list(specs) if keys is None else list(keys)
    missing = [k for k in keys if k not in specs]
    if missing:
        raise UserError(f"{ckpt_dir} holds no tensor {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; run `megatron-staged inspect` on it to list what it holds")
    sd = {k: torch.empty(specs[k][0], dtype=specs[k][1]) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(sd, storage_reader=FileSystemReader(ckpt_dir), no_dist=True)
    return sd


def read_model_tensors(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The model's global tensors (no optimizer state)."""
    return read_global_tensors(ckpt_dir, [k for k in tensor_specs(ckpt_dir) if is_model_key(k)])
