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
  distributed optimizer's own shards (fp32 masters and moments, each data-parallel rank's owned
  range as views cut into boxes), or a non-distributed optimizer's model-space ShardedTensors,
  captured under the *source* layout. Ranks exchange what they hold and what they want once
  (``all_gather_object``); per slot, each box moves from one rank that holds it (the requester
  itself when it can, so no copy crosses the network) with one send per (sender, receiver) pair
  (``batch_isend_irecv``, gloo or NCCL); a held box is released after the last slot that reads it.

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

    Construct under the *source* layout on every rank. A distributed optimizer's state is taken
    as it lies: each data-parallel rank's owned range of every parameter (megatron's
    ``gbuf_ranges``), as views of its fp32 master and moment tensors, cut into the boxes that flat
    range covers in the parameter's model shard (:func:`flat_range_boxes`); nothing is gathered
    over data-parallel ranks and nothing is copied. Any other optimizer's state comes from its
    model-space ShardedTensors (each rank holds whole local tensors). Only the tensors a growth
    reads are kept (the fp32 master instead of the model weight where there is one), so the caller
    can drop the source model and optimizer right after; each held box is released after the last
    slot that reads it. Later calls use the world group only, so the process groups may be rebuilt
    for the target layout in between. Collective (one ``all_gather_object``).
    """

    def __init__(self, model_chunks, optimizer):
        t0 = time.time()
        # key -> layer -> tiling -> {box: tensor}: boxes of one tiling are disjoint and together
        # cover the tensor (one tiling per replica of a tensor, e.g. per tensor-parallel rank for
        # a replicated norm, whose data-parallel ranges differ between those ranks' buffers)
        self.holdings: dict = defaultdict(lambda: defaultdict(dict))
        self.shapes: dict = {}
        for key, tiling, box, data, shape in live_shards(model_chunks, optimizer):
            self.shapes[key] = shape
            self.holdings[key][layer_of(key, box)][(tiling, box)] = data
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        # where the buffers live: the current device under NCCL, host memory under gloo
        self.device = collective_device()
        everyone = [None] * self.world
        dist.all_gather_object(everyone, {"holds": self.held(), "shapes": self.shapes})
        # key -> layer -> tiling -> box -> ranks
        self.holders: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
        for r, info in enumerate(everyone):
            for key, tiling, box in info["holds"]:
                self.holders[key][layer_of(key, box)][tiling][box].append(r)
            for k, v in info["shapes"].items():
                self.shapes.setdefault(k, v)
        self.sends: dict = {}
        self.recvs: dict = {}
        self.locals: dict = {}
        self.release: dict = {}
        self.whole: dict = {}
        self.wants: list = []
        self.stats = {"bytes_moved": 0, "bytes_local": 0, "bytes_sent": 0, "capture_seconds": time.time() - t0}

    def held(self) -> list:
        return [(key, tiling, box) for key, by_layer in self.holdings.items() for boxes in by_layer.values()
                for tiling, box in boxes]

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
        self.whole = defaultdict(set)  # slot -> this rank's boxes that one part covers whole
        last_use: dict = {}
        for receiver, wants in enumerate(everyone):
            for slot, wanted in enumerate(wants):
                for key, box in wanted:
                    parts = self._parts(holders, key, box, receiver)
                    if receiver == self.rank and len(parts) == 1:
                        self.whole[slot].add((key, box))
                    for sender, hkey, inter in parts:
                        if sender == self.rank:
                            last_use[(key, hkey)] = max(last_use.get((key, hkey), -1), slot)
                        if sender == receiver == self.rank:
                            self.locals[slot].append((key, box, hkey, inter))
                        elif sender == self.rank:
                            self.sends[slot][receiver].append((key, hkey, inter))
                        elif receiver == self.rank:
                            self.recvs[slot][sender].append((key, box, inter))
        # a held box no rank reads is released now; the others after the last slot that reads them
        self.release = defaultdict(list)
        for key, by_layer in self.holdings.items():
            for layer, boxes in by_layer.items():
                for hkey in boxes:
                    self.release[last_use.get((key, hkey), -1)].append((key, layer, hkey))
        self._release(-1)
        self.stats["plan_seconds"] = time.time() - t0

    @staticmethod
    def _parts(holders, key: str, box: tuple, receiver: int) -> list:
        """(sender, (tiling, held box), intersection) covering ``box`` from one tiling: one the
        receiver holds part of (so it copies what it holds), else one chosen by the receiver's
        rank (spreads the sending over replicas); within it, the receiver itself where it holds
        the data, else one of the ranks holding that box."""
        if key not in holders:
            raise KeyError(f"no rank holds source tensor {key!r}")
        tilings = holders[key].get(layer_of(key, box), {})
        mine = sorted(t for t in tilings if any(receiver in rs for rs in tilings[t].values()))
        others = sorted(t for t in tilings if t not in mine)
        k = receiver % len(others) if others else 0
        order = mine + others[k:] + others[:k]
        covered = 0
        for tiling in order:
            out, covered = [], 0
            for hbox, ranks in tilings[tiling].items():
                inter = intersect(box, hbox)
                if inter is None:
                    continue
                sender = receiver if receiver in ranks else ranks[receiver % len(ranks)]
                out.append((sender, (tiling, hbox), inter))
                covered += box_numel(inter)
            if covered == box_numel(box):
                return out
        raise RuntimeError(f"source shards of {key!r} cover {covered} of the {box_numel(box)} "
                           f"elements of box {box}")

    def fetch(self, slot: int) -> dict:
        """This slot's boxes for this rank; every rank calls it for every slot (collective).

        A box that one part covers whole is no copy: a view of the held tensor (held here) or of
        the receive buffer (from one other rank); only boxes pieced together from several shards
        are assembled in a new tensor."""
        whole = self.whole.get(slot, set())
        out = {}
        for key, box, hkey, inter in self.locals.get(slot, []):
            held = self._held(key, hkey)
            if (key, box) in whole and held.dtype == torch.float32 and held.device == torch.device(self.device):
                out[(key, box)] = held[relative(inter, hkey[1])]
        ops, inbox, keep = [], [], []
        for sender, items in sorted(self.recvs.get(slot, {}).items()):
            buf = torch.empty(sum(box_numel(inter) for _, _, inter in items), dtype=torch.float32, device=self.device)
            at = 0
            for key, box, inter in items:
                if (key, box) in whole:
                    out[(key, box)] = buf[at:at + box_numel(box)].view(box_shape(box))
                at += box_numel(inter)
            inbox.append((buf, items))
            ops.append(dist.P2POp(dist.irecv, buf, sender))
        for key, box in (self.wants[slot] if slot < len(self.wants) else []):
            if (key, box) not in out:
                out[(key, box)] = torch.empty(box_shape(box), dtype=torch.float32, device=self.device)
        for receiver, items in sorted(self.sends.get(slot, {}).items()):
            buf = torch.empty(sum(box_numel(inter) for _, _, inter in items), dtype=torch.float32, device=self.device)
            at = 0
            for key, hkey, inter in items:
                n = box_numel(inter)
                buf[at:at + n].view(box_shape(inter)).copy_(self._held(key, hkey)[relative(inter, hkey[1])])
                at += n
            keep.append(buf)
            ops.append(dist.P2POp(dist.isend, buf, receiver))
            self.stats["bytes_sent"] += buf.numel() * buf.element_size()
        for key, box, hkey, inter in self.locals.get(slot, []):
            part = self._held(key, hkey)[relative(inter, hkey[1])]
            if out[(key, box)].data_ptr() != part.data_ptr():
                out[(key, box)][relative(inter, box)] = part
            self.stats["bytes_local"] += box_numel(inter) * 4
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        del keep
        for buf, items in inbox:
            at = 0
            for key, box, inter in items:
                n = box_numel(inter)
                if (key, box) not in whole:
                    out[(key, box)][relative(inter, box)] = buf[at:at + n].view(box_shape(inter))
                at += n
            self.stats["bytes_moved"] += buf.numel() * buf.element_size()
        self._release(slot)
        return out

    def _held(self, key: str, hkey: tuple) -> torch.Tensor:
        return self.holdings[key][layer_of(key, hkey[1])][hkey]

    def _release(self, slot: int) -> None:
        """Drop the held boxes no later slot reads (a moment's last view frees it)."""
        for key, layer, hkey in self.release.pop(slot, []):
            self.holdings[key][layer].pop(hkey, None)

    def close(self) -> None:
        """Drop the captured source tensors (the last references to the source state)."""
        self.holdings.clear()
        self.holders = {}
        self.sends, self.recvs, self.locals, self.release, self.whole = {}, {}, {}, {}, {}
        return_freed_memory()


def flat_range_boxes(shape: tuple, start: int, stop: int) -> list:
    """The boxes (each contiguous in row-major order) that make up the flat element range
    [start, stop) of a tensor of ``shape``, in order, with each box's flat start: at most two
    partial boxes per axis around one run of whole rows."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [(((start, stop),), start)]
    inner = 1
    for n in shape[1:]:
        inner *= n
    r0, o0 = divmod(start, inner)
    r1, o1 = divmod(stop, inner)
    if r0 == r1:
        return [(((r0, r0 + 1),) + box, r0 * inner + at) for box, at in flat_range_boxes(shape[1:], o0, o1)]
    out = []
    if o0:
        out += [(((r0, r0 + 1),) + box, r0 * inner + at) for box, at in flat_range_boxes(shape[1:], o0, inner)]
        r0 += 1
    if r1 > r0:
        out.append((((r0, r1),) + tuple((0, n) for n in shape[1:]), r0 * inner))
    if o1:
        out += [(((r1, r1 + 1),) + box, r1 * inner + at) for box, at in flat_range_boxes(shape[1:], 0, o1)]
    return out


def live_shards(model_chunks, optimizer):
    """Yield (key, tiling, global box, tensor, global shape) for every source shard a growth may
    read: a distributed optimizer's owned ranges (fp32 master as ``optimizer.state.param.<key>``,
    moments as ``optimizer.state.<kind>.<key>``) and the weights of parameters it does not
    optimize; else the model's and the optimizer's model-space ShardedTensors."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_staged.checkpoint.manager import build_state_dict, model_sharded_state_dict
    from megatron_staged.model.builder import iter_sharded_tensors

    inner = (getattr(optimizer, "chained_optimizers", None) or [optimizer]) if optimizer is not None else []
    if inner and all(isinstance(o, DistributedOptimizer) for o in inner):
        model_sts = [st for v in model_sharded_state_dict(model_chunks).values() for st in iter_sharded_tensors(v)]
        yield from _distributed_optimizer_shards(inner, model_chunks, model_sts)
        return
    sd = build_state_dict(model_chunks, optimizer, None, {}, is_loading=False,
                          with_optimizer=optimizer is not None, with_rng=False)
    shards = list(iter_sharded_tensors(sd))
    keys = {st.key for st in shards}
    for st in shards:
        if not st.key.startswith(OPT_PREFIX) and (f"{OPT_PREFIX}param.{st.key}" in keys
                                                  or f"{OPT_PREFIX}fp32_param.{st.key}" in keys):
            continue  # the fp32 master is read instead of the (possibly lower precision) weight
        box = shard_box(st)
        yield st.key, (), box, st.data.detach().reshape(box_shape(box)), tuple(st.global_shape)


def _distributed_optimizer_shards(inner: list, model_chunks, model_sts: list):
    from collections import ChainMap

    from megatron_staged.growth.engine import param_of

    params = [p for c in model_chunks for p in c.parameters()]
    views = defaultdict(list)  # id(param) -> [(ShardedTensor, flat offset of the view in the param)]
    for st in model_sts:
        p, off = param_of(st, params)
        if p is not None:
            views[id(p)].append((st, off))
    optimized = set()
    for opt in inner:
        for buffer in opt.buffers:
            optimized.update(id(p) for p in buffer.param_index_map)
        for gbuf_range_maps in opt.gbuf_ranges:
            for per_bucket in gbuf_range_maps.values():
                for p, ranges in ChainMap(*(b["param_map"] for b in per_bucket)).items():
                    owned = ranges["param"]
                    states = opt._get_main_param_and_optimizer_states(p)
                    for st, off in views.get(id(p), []):
                        a, b = max(owned.start, off), min(owned.end, off + st.data.numel())
                        n = st.prepend_axis_num
                        prefix = tuple((o, o + 1) for o in st.global_offset[:n])
                        tiling = tuple(st.replica_id[:-1]) if isinstance(st.replica_id, tuple) else ()
                        tiling += (getattr(opt, "distributed_optimizer_instance_id", 0),)
                        for rel, at in flat_range_boxes(tuple(st.local_shape), a - off, b - off):
                            box = prefix + tuple((o + lo, o + hi) for o, (lo, hi) in zip(st.global_offset[n:], rel))
                            lo = off + at - owned.start
                            for kind in ("param", "exp_avg", "exp_avg_sq"):
                                if kind in states:
                                    data = states[kind].detach().view(-1)[lo:lo + box_numel(rel)].view(box_shape(box))
                                    yield f"{OPT_PREFIX}{kind}.{st.key}", tiling, box, data, tuple(st.global_shape)
    for st in model_sts:  # weights no optimizer updates (e.g. frozen): the model's own
        p, _ = param_of(st, params)
        if p is None or id(p) not in optimized:
            box = shard_box(st)
            yield st.key, (), box, st.data.detach().reshape(box_shape(box)), tuple(st.global_shape)
