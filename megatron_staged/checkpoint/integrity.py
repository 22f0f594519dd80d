"""Is a checkpoint directory complete and undamaged? Checked before anything reads it.

Two sources of truth:

* torch DCP's ``.metadata`` says, for every stored item, which ``*.distcp`` file holds it at which
  byte offset and length: a file that is missing or shorter than its last item is damaged. This
  needs nothing from the writer, so it also covers checkpoints saved before manifests existed.
* ``manifest.json``, written by every save before the atomic rename, lists each file of the
  checkpoint with its size and CRC-32 (each rank checksums the ``__<rank>_*.distcp`` files it
  wrote, so the cost is spread over the job). Sizes are checked on every load; checksums by
  ``megatron-staged inspect --verify`` (which reads every byte). CRC-32 detects damage (truncation,
  bit rot, a partial copy), not deliberate tampering.

:func:`problems` lists what is wrong; :func:`require_intact` raises the first as a one-line
:class:`UserError` naming the file.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Optional

from megatron_staged.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 16 << 20


def crc32_of(path: str) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _describe(path: str) -> dict:
    return {"size": os.path.getsize(path), "crc32": crc32_of(path)}


def write_manifest(ckpt_dir: str) -> None:
    """Record every file of a just-saved checkpoint (call on all ranks, after the save, before the rename)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {}
    for name in sorted(os.listdir(ckpt_dir)):
        if name == MANIFEST or not os.path.isfile(os.path.join(ckpt_dir, name)):
            continue
        own = name.startswith(f"__{rank}_") if name.endswith(".distcp") else rank == 0
        if own:
            mine[name] = _describe(os.path.join(ckpt_dir, name))
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    if rank == 0:
        files = {}
        for p in parts:
            files.update(p)
        # a .distcp whose writer rank is not in this job (never expected) is still recorded
        for name in sorted(os.listdir(ckpt_dir)):
            path = os.path.join(ckpt_dir, name)
            if name != MANIFEST and name not in files and os.path.isfile(path):
                files[name] = _describe(path)
        tmp = os.path.join(ckpt_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({"version": MANIFEST_VERSION, "checksum": "crc32", "files": files}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, MANIFEST))


def read_manifest(ckpt_dir: str):
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            m = json.load(fh)
        files = m["files"]
        assert isinstance(files, dict) and all(isinstance(v, dict) and "size" in v for v in files.values())
        return m
    except Exception:  # noqa: BLE001
        raise UserError(f"{path} is damaged: not a readable checkpoint manifest") from None


def other_format(ckpt_dir: str) -> Optional[str]:
    """A sentence when ``ckpt_dir`` holds a Megatron-LM checkpoint in a format this project does not
    read (a ``metadata.json`` naming another sharded backend than torch_dist, e.g. zarr), else None.
    The legacy ``torch`` format (``mp_rank_*/model_optim_rng.pt``) is read (``checkpoint.legacy_torch``)."""
    convert = ("convert it with Megatron-LM first: resume it there once with --ckpt-convert-format torch_dist "
               "--ckpt-convert-save DIR, and --load DIR here")
    try:
        names = sorted(os.listdir(ckpt_dir))
    except OSError:
        return None
    meta = os.path.join(ckpt_dir, "metadata.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as fh:
                backend = json.load(fh).get("sharded_backend")
        except Exception:  # noqa: BLE001 - unreadable: the damage checks below say so
            return None
        if backend and backend != "torch_dist":
            return (f"{ckpt_dir} is a dist_checkpointing checkpoint in the '{backend}' format; megatron_staged "
                    f"reads the torch_dist and legacy torch formats only: {convert}")
    return None


def problems(ckpt_dir: str, checksums: bool = False) -> list[str]:
    """What is wrong with ``ckpt_dir`` (empty if nothing): one sentence per problem, naming the file."""
    from megatron_staged.checkpoint.safe_load import UnsafeCheckpoint, load_dcp_metadata

    found = []
    if not os.path.isdir(ckpt_dir):
        return [f"{ckpt_dir} is missing"]
    common = os.path.join(ckpt_dir, "common.pt")
    from megatron_staged.checkpoint import legacy_torch

    if not os.path.isfile(common) and legacy_torch.is_legacy_dir(ckpt_dir):
        return legacy_torch.problems(ckpt_dir)  # Megatron-LM's legacy torch format: every rank's file present
    if not os.path.isfile(common):
        other = other_format(ckpt_dir)
        if other:
            raise UserError(other)  # not damage: another format, said as such
        found.append(f"{common} is missing")
    try:
        manifest = read_manifest(ckpt_dir)
    except UserError as e:
        found.append(str(e))
        manifest = None
    if manifest:
        for name, rec in sorted(manifest["files"].items()):
            path = os.path.join(ckpt_dir, name)
            if not os.path.isfile(path):
                found.append(f"{path} is missing (listed in {MANIFEST})")
                continue
            size = os.path.getsize(path)
            if size != rec["size"]:
                found.append(f"{path} is damaged: {size} bytes, {MANIFEST} recorded {rec['size']} (truncated or overwritten)")
            elif checksums and rec.get("crc32") and crc32_of(path) != rec["crc32"]:
                found.append(f"{path} is damaged: its CRC-32 differs from the one {MANIFEST} recorded at save time")
    if found:
        return found  # the metadata check below would only repeat these
    try:
        md = load_dcp_metadata(ckpt_dir)
    except UnsafeCheckpoint:
        raise  # not damage: a refusal, reported as such
    except UserError as e:
        return [str(e)]
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, n in sorted(need.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            found.append(f"{path} is missing (.metadata lists data in it)")
        elif os.path.getsize(path) < n:
            found.append(f"{path} is truncated: {os.path.getsize(path)} bytes, .metadata needs at least {n}")
    return found


def require_intact(ckpt_dir: str, checksums: bool = False) -> None:
    found = problems(ckpt_dir, checksums)
    if found:
        more = f" (and {len(found) - 1} more problem(s); `megatron-staged inspect --verify` lists them)" if len(found) > 1 else ""
        raise UserError(f"damaged checkpoint: {found[0]}{more}")
