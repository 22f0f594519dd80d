"""Where a growth reads the source training state from: one engine, two sources.

Both sources answer the same question, "the values of source tensor ``key`` on box ``box``", where
a key is a megatron-core checkpoint key (``decoder.layers.mlp.linear_fc1.weight``,
``optimizer.state.exp_avg.<key>``, ``optimizer.state.param.<key>`` for the fp32 master) and a box
is a (start, stop) pair per axis of the key's *global* tensor (the stacked layer axis first for
``decoder.layers`` keys). The engine (:mod:`megatron_staged.growth.engine`) walks the same
sequence of slots on every rank; before the first slot it hands each source every box it will ask
for, slot by slot (:meth:`prepare`), then asks for one slot at a time (:meth:`fetch`).

- :class:`CheckpointSource` reads a torch_dist checkpoint (offline ``megatron-staged grow``): each
  box is read on its own through torch DCP's reader, which loads only the stored chunks that
  overlap it (a chunk is one layer's tensor-parallel shard as saved). Nothing is collective.
- :class:`LiveSource` serves the running job's in-memory shards (growth at a stage boundary): the
  model's and the distributed optimizer's ShardedTensors, captured under the *source* layout.
  Ranks exchange what they hold and what they want once (``all_gather_object``); per slot, each
  box moves from one rank that holds it (the requester itself when it can, so no copy crosses the
  network) with one send per (sender, receiver) pair (``batch_isend_irecv``, gloo or NCCL).

Statistics: ``bytes_moved`` (read from storage, or received from other ranks), ``bytes_local``
(copied from this rank's own source shards), ``bytes_sent``.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from megatron_staged.runtime.distributed import collective_device

OPT_PREFIX = "optimizer.state."


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them mapped, so the RSS of a process that
    freed a source model would not fall); a no-op elsewhere."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def box_shape(box: tuple) -> tuple:
    return tuple(b - a for a, b in box)


def box_numel(box: tuple) -> int:
    n = 1
    for a, b in box:
        n *= b - a
    return n


def intersect(a: tuple, b: tuple) -> Optional[tuple]:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def relative(inner: tuple, outer: tuple) -> tuple:
    """Slices selecting ``inner`` inside a tensor that holds ``outer``."""
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(inner, outer))


def layer_of(key: str, box: tuple) -> int:
    """The stacked layer a box lies in (-1 for tensors outside the layer stack): an index key."""
    return box[0][0] if "decoder.layers." in key else -1


def shard_box(st) -> tuple:
    """The global box a megatron ShardedTensor covers (prepended layer axes included)."""
    n = st.prepend_axis_num
    shape = (1,) * n + tuple(st.local_shape)
    return tuple((o, o + s) for o, s in zip(st.global_offset, shape))


class CheckpointSource:
    """Boxes of a torch_dist checkpoint's tensors, read with torch DCP's storage reader."""

    def __init__(self, ckpt_dir: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = ckpt_dir
        self.reader = FileSystemReader(ckpt_dir)
        meta = self.reader.read_metadata()
        self.reader.set_up_storage_reader(meta, is_coordinator=False)
        self.meta = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self.shapes = {k: tuple(v.size) for k, v in self.meta.items()}
        self.requests: list = []
        self.stats = {"bytes_moved": 0, "bytes_local": 0, "bytes_sent": 0, "bytes_stored_read": 0}

    def prepare(self, requests: list) -> None:
        """``requests[slot]``: the (key, box) pairs this rank will fetch in that slot."""
        self.requests = requests

    def fetch(self, slot: int) -> dict:
        return {(key, box): self.read(key, box) for key, box in self.requests[slot]}

    def read(self, key: str, box: tuple) -> torch.Tensor:
        """One box of one tensor; DCP loads each overlapping stored chunk and narrows it."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.meta[key]
        out = torch.empty(box_shape(box), dtype=md.properties.dtype)
        want = ChunkStorageMetadata(offsets=torch.Size([a for a, _ in box]), sizes=torch.Size(box_shape(box)))
        items = create_read_items_for_chunk_list(key, md, [want])
        self.reader.read_data(LoadPlan(items), _CopyInto(out)).wait()
        self.stats["bytes_moved"] += out.numel() * out.element_size()
        self.stats["bytes_stored_read"] += sum(self.reader.storage_data[i.storage_index].length for i in items)
        return out

    def close(self) -> None:
        self.requests = []


class _CopyInto:
    """The two planner calls DCP's reader makes: where a read item goes, and that it arrived."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item):
        from torch.distributed._shard._utils import narrow_tensor_by_index

        return narrow_tensor_by_index(self.out, item.dest_offsets, item.lengths)

    def commit_tensor(self, item, tensor) -> None:
        pass


class LiveSource:
    """The running job's own shards: model weights, fp32 masters and Adam moments.

    Construct under the *source* layout on every rank (collective: the distributed optimizer
    gathers its state over data-parallel ranks into model-space tensors). It keeps only the tensors
    a growth reads (the fp32 master instead of the model weight where there is one), so the caller
    can drop the source model and optimizer right after. Later calls use the world group only, so
    the process groups may be rebuilt for the target layout in between.
    """

    def __init__(self, model_chunks, optimizer):
        from megatron_staged.checkpoint.manager import build_state_dict
        from megatron_staged.model.builder import iter_sharded_tensors

        t0 = time.time()
        sd = build_state_dict(model_chunks, optimizer, None, {}, is_loading=False,
                              with_optimizer=optimizer is not None, with_rng=False)
        shards = [st for st in iter_sharded_tensors(sd)]
        keys = {st.key for st in shards}
        self.holdings: dict = defaultdict(dict)  # key -> {layer start: {box: tensor}}
        self.shapes: dict = {}
        for st in shards:
            if not st.key.startswith(OPT_PREFIX) and (f"{OPT_PREFIX}param.{st.key}" in keys
                                                      or f"{OPT_PREFIX}fp32_param.{st.key}" in keys):
                continue  # the fp32 master is read instead of the (possibly lower precision) weight
            box = shard_box(st)
            self.shapes[st.key] = tuple(st.global_shape)
            self.holdings[st.key].setdefault(layer_of(st.key, box), {})[box] = st.data.detach().reshape(box_shape(box))
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        # where the buffers live: the current device under NCCL, host memory under gloo
        self.device = collective_device()
        everyone = [None] * self.world
        dist.all_gather_object(everyone, {"holds": self.held(), "shapes": self.shapes})
        self.holders: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # key -> layer -> box -> ranks
        for r, info in enumerate(everyone):
            for key, box in info["holds"]:
                self.holders[key][layer_of(key, box)][box].append(r)
            for k, v in info["shapes"].items():
                self.shapes.setdefault(k, v)
        self.sends: dict = {}
        self.recvs: dict = {}
        self.locals: dict = {}
        self.wants: list = []
        self.stats = {"bytes_moved": 0, "bytes_local": 0, "bytes_sent": 0, "capture_seconds": time.time() - t0}

    def held(self) -> list:
        return [(key, box) for key, by_layer in self.holdings.items() for boxes in by_layer.values() for box in boxes]

    def prepare(self, requests: list) -> None:
        """Exchange (once) what every rank wants, and plan every slot's transfers."""
        t0 = time.time()
        everyone = [None] * self.world
        dist.all_gather_object(everyone, requests)
        holders = self.holders
        self.wants = requests
        n_slots = max(len(wants) for wants in everyone)
        self.sends = {s: defaultdict(list) for s in range(n_slots)}
        self.recvs = {s: defaultdict(list) for s in range(n_slots)}
        self.locals = {s: [] for s in range(n_slots)}
        for receiver, wants in enumerate(everyone):
            for slot, wanted in enumerate(wants):
                for key, box in wanted:
                    for part in self._parts(holders, key, box, receiver):
                        sender, hbox, inter = part
                        if sender == receiver == self.rank:
                            self.locals[slot].append((key, box, hbox, inter))
                        elif sender == self.rank:
                            self.sends[slot][receiver].append((key, hbox, inter))
                        elif receiver == self.rank:
                            self.recvs[slot][sender].append((key, box, inter))
        self.stats["plan_seconds"] = time.time() - t0

    @staticmethod
    def _parts(holders, key: str, box: tuple, receiver: int) -> list:
        """(sender, held box, intersection) covering ``box``: the receiver itself where it holds the
        data, else one replica chosen by the receiver's rank (spreads the sending over replicas)."""
        if key not in holders:
            raise KeyError(f"no rank holds source tensor {key!r}")
        out, covered = [], 0
        for hbox, ranks in holders[key].get(layer_of(key, box), {}).items():
            inter = intersect(box, hbox)
            if inter is None:
                continue
            sender = receiver if receiver in ranks else ranks[receiver % len(ranks)]
            out.append((sender, hbox, inter))
            covered += box_numel(inter)
        if covered != box_numel(box):
            raise RuntimeError(f"source shards of {key!r} cover {covered} of the {box_numel(box)} "
                               f"elements of box {box}")
        return out

    def fetch(self, slot: int) -> dict:
        """This slot's boxes for this rank; every rank calls it for every slot (collective)."""
        out = {(key, box): torch.empty(box_shape(box), dtype=torch.float32, device=self.device)
               for key, box in self.wants[slot]} if slot < len(self.wants) else {}
        ops, inbox, keep = [], [], []
        for receiver, items in sorted(self.sends.get(slot, {}).items()):
            # megatron's gathered optimizer state sits in host memory: NCCL sends from the device
            buf = torch.cat([self._held(key, hbox)[relative(inter, hbox)].reshape(-1).float()
                             for key, hbox, inter in items]).to(self.device)
            keep.append(buf)
            ops.append(dist.P2POp(dist.isend, buf, receiver))
            self.stats["bytes_sent"] += buf.numel() * buf.element_size()
        for sender, items in sorted(self.recvs.get(slot, {}).items()):
            buf = torch.empty(sum(box_numel(inter) for _, _, inter in items), dtype=torch.float32, device=self.device)
            inbox.append((buf, items))
            ops.append(dist.P2POp(dist.irecv, buf, sender))
        for key, box, hbox, inter in self.locals.get(slot, []):
            part = self._held(key, hbox)[relative(inter, hbox)].to(self.device)
            out[(key, box)][relative(inter, box)] = part
            self.stats["bytes_local"] += part.numel() * 4
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for buf, items in inbox:
            at = 0
            for key, box, inter in items:
                n = box_numel(inter)
                out[(key, box)][relative(inter, box)] = buf[at:at + n].view(box_shape(inter))
                at += n
            self.stats["bytes_moved"] += buf.numel() * buf.element_size()
        return out

    def _held(self, key: str, box: tuple) -> torch.Tensor:
        return self.holdings[key][layer_of(key, box)][box]

    def close(self) -> None:
        """Drop the captured source tensors (the last references to the source state)."""
        self.holdings.clear()
        self.holders = {}
        self.sends, self.recvs, self.locals = {}, {}, {}
        return_freed_memory()
