"""Reading checkpoints without running code from them.

A checkpoint downloaded from elsewhere is untrusted input. Three of its files are pickles, and an
ordinary unpickler imports and calls whatever a pickle names (``__reduce__``):

* ``common.pt`` (args, iteration, train state, scheduler): written with ``torch.save``;
* ``.metadata`` (torch DCP's index of every tensor and shard): ``pickle.dump`` of DCP's dataclasses;
* byte entries inside ``*.distcp`` (the per-rank RNG state, modules' ``_extra_state``): ``torch.save``
  buffers, which torch DCP's default planner reads with ``torch.load(weights_only=False)``.

This module reads them all as data: ``torch.load(weights_only=True)`` (tensors, numbers, strings,
lists, tuples, dicts only) for the ``torch.save`` files, and an unpickler restricted to DCP's own
metadata dataclasses for ``.metadata``. On top of plain data, exactly what Megatron-LM's
``save_checkpoint`` writes is allowed (:data:`MEGATRON_LM_GLOBALS`): its ``args`` is an
``argparse.Namespace`` (rebuilt by setting attributes, no constructor code), its RNG state holds
numpy's ``np.random.get_state()`` (a uint32 ``ndarray``, rebuilt by numpy's ``_reconstruct``), and
a few of its argument values are megatron-core enums (rebuilt by value lookup). Checkpoints saved
here before the Megatron-LM-compatible format also hold numpy RNG arrays; they load the same way.

:func:`untrusted_checkpoint_reads` applies this to megatron-core's and torch DCP's own loaders for the
duration of a ``with`` block (every CLI command runs inside one); :func:`load_torch_file` and
:func:`load_dcp_metadata` are the direct readers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import pickle
import sys
import threading
from typing import Any

import torch

from megatron_staged.errors import UserError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


# What Megatron-LM's checkpoints name beyond plain data (core_v0.16.1's ``save_checkpoint``, checked on
# the fixture in tests/fixtures/megatron_lm): pickled name -> (module, attribute, kind). "enum": an
# Enum class, rebuilt by value lookup; "namespace": attributes set from a dict, no constructor code;
# "numpy": numpy's array/dtype rebuilders (np.random.get_state()'s uint32 key array).
MEGATRON_LM_GLOBALS = {
    "argparse.Namespace": ("argparse", "Namespace", "namespace"),
    "signal.Signals": ("signal", "Signals", "enum"),  # args.exit_signal
    "megatron.core.enums.ModelType": ("megatron.core.enums", "ModelType", "enum"),  # args.model_type
    "megatron.core.transformer.enums.AttnBackend": ("megatron.core.transformer.enums", "AttnBackend", "enum"),
    "numpy.ndarray": ("numpy", "ndarray", "numpy"),
    "numpy.dtype": ("numpy", "dtype", "numpy"),
    "numpy._core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct", "numpy"),
    "numpy.core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct", "numpy"),  # numpy 1.x files
    "numpy.dtypes.UInt32DType": ("numpy.dtypes", "UInt32DType", "numpy"),
}


def _resolve(name: str):
    import importlib

    module, attr, kind = MEGATRON_LM_GLOBALS[name]
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        if module == "numpy._core.multiarray":  # numpy < 2
            return _resolve_numpy1(attr)
        return None
    if kind == "enum" and not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        return None
    return obj


def _resolve_numpy1(attr: str):
    import numpy as np

    return getattr(np.core.multiarray, attr, None)


def allowed_globals(names=None, megatron: bool = True):
    """``torch.serialization.safe_globals`` for :data:`MEGATRON_LM_GLOBALS` (those in ``names`` only, so
    that reading a file that names no megatron-core enum imports no megatron; ``megatron=False``: none
    of megatron-core's own classes)."""
    pairs = []
    if names is not None and any(MEGATRON_LM_GLOBALS.get(n, (None, None, None))[2] == "numpy" for n in names):
        # numpy's rebuilders come as a group: the pickle names numpy.dtype, and torch's weights-only
        # unpickler then also checks the dtype class it returns (numpy.dtypes.UInt32DType)
        names = set(names) | {n for n, v in MEGATRON_LM_GLOBALS.items() if v[2] == "numpy"}
    for name in MEGATRON_LM_GLOBALS:
        if names is not None and name not in names:
            continue
        if not megatron and name.startswith("megatron."):
            continue
        obj = _resolve(name)
        if obj is not None:
            pairs.append((obj, name))
    return torch.serialization.safe_globals(pairs)


def _allowed_global(module: str, name: str):
    """The object a DCP ``.metadata`` pickle may name, or None if it may not name it."""
    import importlib

    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout  # maps a layout's name to torch.strided etc.
    if module in _DCP_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
    return None


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not checkpoint metadata")
        return obj


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside torch DCP's filesystem reader: loads are restricted."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(fh, *args, **kwargs):
        return _DataOnlyUnpickler(fh).load()


class UnsafeCheckpoint(UserError):
    """A checkpoint file names code to run when unpickled; it is refused, never executed."""


def unsafe_global(text: str):
    """The global a refused pickle names ('posix.system'), from torch's or our unpickler's message; else None."""
    import re

    m = (re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
         or re.search(r"unsupported GLOBAL ([\w.]+) whose module", text)  # torch's blocked modules (os, sys, ...)
         or re.search(r"via `add_safe_globals`, but got <class '([\w.]+)'>", text)  # e.g. a numpy object array
         or re.search(r"it names ([\w.]+), which", text))
    return m.group(1) if m else None


def refusal(path: str, name: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"refusing to read {path}: it is not plain checkpoint data (it names {name}, which "
                            f"unpickling would call); checkpoints are read as data only - do not load it with "
                            f"other tools unless you trust its source")


def _named_globals(path: str) -> set:
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a damaged file: torch.load below says so
        return set()


def load_torch_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; UserError naming the file on any failure."""
    try:
        with allowed_globals(_named_globals(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = unsafe_global(str(e))
        if name:
            raise refusal(path, name) from None
        raise UserError(f"{path} is damaged: cannot read it (not a torch.save file)") from None
    except Exception as e:  # noqa: BLE001 - a truncated/garbled file is bad input too
        msg = str(e).strip().splitlines()
        raise UserError(f"{path} is damaged: cannot read it ({type(e).__name__}: {msg[0] if msg else ''})") from None


def load_dcp_metadata(ckpt_dir: str):
    """torch DCP's ``Metadata`` of ``ckpt_dir/.metadata`` through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = os.path.join(ckpt_dir, ".metadata")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; {ckpt_dir} is not a complete torch_dist checkpoint")
    try:
        with open(path, "rb") as fh:
            md = _DataOnlyUnpickler(fh).load()
    except pickle.UnpicklingError as e:
        name = unsafe_global(str(e))
        if name:
            raise refusal(path, name) from None
        raise UserError(f"{path} is damaged: cannot read it ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled
        raise UserError(f"{path} is damaged: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise UserError(f"{path} does not hold torch DCP metadata (found {type(md).__name__})")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


_lock = threading.RLock()
_depth = 0
_saved: dict = {}


def _allow_megatron_globals() -> None:
    ctx = allowed_globals([n for n in MEGATRON_LM_GLOBALS if n.startswith("megatron.")])
    ctx.__enter__()
    _saved["globals"].append(ctx)


def megatron_loaded() -> None:
    """Called where megatron-core is first imported (``runtime.install``): within an
    :func:`untrusted_checkpoint_reads` block, megatron-core's loaders may now read its enums."""
    with _lock:
        if _depth > 0 and len(_saved.get("globals", ())) == 1:
            _allow_megatron_globals()


@contextlib.contextmanager
def untrusted_checkpoint_reads():
    """Within the block, megatron-core's and torch DCP's checkpoint loaders read data only.

    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` makes every ``torch.load`` weights-only, including DCP's
    ``torch.load(weights_only=False)`` of byte entries and megatron's ``common.pt`` read, with
    :data:`MEGATRON_LM_GLOBALS` allowed (megatron-core is loaded by then); DCP's ``.metadata`` reader
    gets the restricted unpickler.
    Re-entrant; restored on exit.
    """
    global _depth
    import torch.distributed.checkpoint.filesystem as fs

    with _lock:
        if _depth == 0:
            _saved["env"] = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            _saved["pickle"] = fs.pickle
            # megatron-core's enums are allowed once it is imported (megatron_loaded), so that a
            # command failing its checks first never imports it
            _saved["globals"] = [allowed_globals(megatron=False)]
            _saved["globals"][0].__enter__()
            if "megatron.core" in sys.modules:
                _allow_megatron_globals()
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
            fs.pickle = _RestrictedPickleModule()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                fs.pickle = _saved.pop("pickle")
                for ctx in reversed(_saved.pop("globals")):
                    ctx.__exit__(None, None, None)
                env = _saved.pop("env")
                if env is None:
                    os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
                else:
                    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = env
