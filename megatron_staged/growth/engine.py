"""Apply a growth to sharded training state: a source in, this rank's target shards filled.

Every rank builds the *target* model and optimizer at the target layout, asks them for their
sharded state dict (megatron ShardedTensors: key, global shape, this rank's offset), and plans,
for each of its target shards, the pieces it is made of (:func:`operators.width_pieces`): each
piece reads one box of one source tensor (of the source layer that ``depth_map`` names) times a
scale, or is a new block. The rank then fetches exactly those boxes from a source
(:mod:`megatron_staged.growth.sources`): a checkpoint on disk (offline ``megatron-staged grow``)
or the running job's own shards (growth at a stage boundary). One engine, two sources.

Ranks walk the same sequence of slots (the non-layer tensors, then each local layer index in
turn), so that the live source can move one slot's boxes between ranks at a time; no rank holds
more than one slot's source boxes, nor any whole layer it does not grow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_staged.growth.operators import (FRESH_INITS, fresh_layer_is_zero, grow_region, grow_width,
                                              grown_shape, identity_init, is_residual_output, width_pieces,
                                              width_rule)
from megatron_staged.growth.spec import GrowthSpec

OPT_PREFIX = "optimizer.state."


def split_state_key(key: str) -> tuple[str, str]:
    """'optimizer.state.exp_avg.decoder.x' -> ('exp_avg', 'decoder.x'); model keys -> ('param', key)."""
    if key.startswith(OPT_PREFIX):
        kind, model_key = key[len(OPT_PREFIX):].split(".", 1)
        return ("param" if kind in ("fp32_param", "param") else kind), model_key
    return "param", key


def _source_key(kind: str, model_key: str, available: set) -> Optional[str]:
    # the fp32 master copy (either optimizer's), else the model weight itself
    from megatron_staged.checkpoint.global_tensors import saved_key

    return saved_key(kind, model_key, available)


def grown_global(model_key: str, kind: str, layer: int, spec: GrowthSpec, old_model_cfg,
                 fetch: Callable[[str, str, Optional[int]], Optional[torch.Tensor]],
                 width_cache: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The grown global tensor of ``model_key`` (one layer's for layer keys) for state ``kind``.

    ``None`` means: not derived from the source (a fresh ``random`` or ``zero`` layer: the target's
    own init for parameters, zeros for moments; ``zero`` also zeroes the residual outputs, see
    :func:`operators.fresh_layer_is_zero`). Under ``depth_init identity`` a fresh (``new``) layer's
    residual outputs are zero, so that it is an identity like the other new layers.
    """
    src_layer = None
    new = False
    if layer >= 0:
        src_layer = spec.depth_map[layer]
        new = spec.new_layer[layer]
        if src_layer is None and spec.depth_init == "identity" and is_residual_output(model_key):
            src_layer = 0  # a fresh ('new') layer under identity: zero residual outputs (shaped as layer 0's)
        if src_layer is None or (new and spec.depth_init in FRESH_INITS):
            return None
    ck = (kind, model_key, src_layer)
    if width_cache is not None and ck in width_cache:
        t = width_cache[ck]
    else:
        t = fetch(kind, model_key, src_layer)
        if t is None:
            return None
        t = t.float()
        if spec.width_factor == 2:
            m = old_model_cfg
            # noise (if any) is seeded by the source layer: every copy of a layer gets the same
            t = grow_width(model_key, kind, t, groups=m.num_query_groups, swiglu=bool(m.swiglu),
                           tied=not m.untie_embeddings_and_output_weights, alpha=spec.width_split,
                           noise_std=spec.width_noise, seed=spec.seed, layer=-1 if src_layer is None else src_layer)
        if width_cache is not None:
            width_cache[ck] = t
    if new and spec.depth_init == "identity":
        t = identity_init(model_key, t)
    return t


def _layer_of(st) -> int:
    return st.global_offset[0] if st.prepend_axis_num else -1


def _target_region(st) -> tuple:
    """The (start, stop) per axis of a target ShardedTensor in its layer's global tensor."""
    n = st.prepend_axis_num
    return tuple((o, o + s) for o, s in zip(st.global_offset[n:], st.local_shape))


# ---- the target side: which regions of which tensors this rank writes ----------------------------

@dataclass
class TargetPart:
    """A rectangular region of one target tensor (of one layer) that this rank writes.

    ``key``: the checkpoint key naming the tensor and the state kind (model key: the weight;
    ``optimizer.state.<kind>.<model key>``: the fp32 master or a moment). ``dest`` receives the
    region's values: a tensor shaped like the region, or a flat one receiving ``flat`` = (start,
    stop) of the region's row-major elements (a distributed optimizer's shard of a parameter).
    ``model_init``: for the optimizer's fp32 master, the model weight's values there (a fresh layer
    keeps the target model's own init).
    """
    key: str
    layer: int
    region: tuple
    where: str
    dest: torch.Tensor
    flat: Optional[tuple] = None
    model_init: Optional[Callable[[], torch.Tensor]] = None

    def region_view(self) -> Optional[torch.Tensor]:
        """``dest`` seen as the whole region, where it is exactly that (written in place, no
        temporary); None where the part is a partial range of rows (a data-parallel shard's ends)."""
        shape = tuple(b - a for a, b in self.region)
        numel = 1
        for n in shape:
            numel *= n
        if self.flat is not None and tuple(self.flat) != (0, numel):
            return None
        if tuple(self.dest.shape) == shape:
            return self.dest
        if self.dest.numel() != numel or not self.dest.is_contiguous():
            return None
        return self.dest.view(shape)

    def write(self, values: torch.Tensor) -> None:
        if self.flat is not None:
            values = values.reshape(-1)[self.flat[0]:self.flat[1]]
        self.dest.copy_(values.reshape(self.dest.shape))


def model_parts(model_chunks) -> tuple:
    """One part per model ShardedTensor (the shard is the parameter, or a view of it)."""
    from megatron_staged.checkpoint.manager import model_sharded_state_dict
    from megatron_staged.model.builder import iter_sharded_tensors

    sts = [st for v in model_sharded_state_dict(model_chunks).values() for st in iter_sharded_tensors(v)]
    return sts, [TargetPart(st.key, _layer_of(st), _target_region(st), "model", st.data) for st in sts]


def param_of(st, params: list):
    """The model parameter whose memory ShardedTensor ``st`` views, and the view's flat offset."""
    ptr = st.data.data_ptr()
    for p in params:
        start = p.data_ptr()
        if start <= ptr < start + p.numel() * p.element_size():
            return p, (ptr - start) // p.element_size()
    return None, 0  # not a parameter: no optimizer state


def distributed_optimizer_parts(optimizer, model_chunks, sts: list) -> list:
    """Parts written straight into a distributed optimizer's own shards: for each parameter, the
    contiguous range of its flattened local tensor that this data-parallel rank owns, as the rows
    of the model shard that range spans (so a rank reads only about 1/DP of the moments)."""
    from collections import ChainMap

    params = [p for c in model_chunks for p in c.parameters()]
    views = {}
    for st in sts:
        p, off = param_of(st, params)
        if p is not None:
            views.setdefault(id(p), []).append((st, off))
    parts = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for gbuf_range_maps in opt.gbuf_ranges:
            for per_bucket in gbuf_range_maps.values():
                for p, ranges in ChainMap(*(b["param_map"] for b in per_bucket)).items():
                    owned = ranges["param"]
                    states = opt._get_main_param_and_optimizer_states(p)
                    covered = 0
                    for st, off in views.get(id(p), []):
                        parts += _owned_rows(st, off, owned.start, owned.end, p, states)
                        covered += max(0, min(owned.end, off + st.data.numel()) - max(owned.start, off))
                    if covered < owned.end - owned.start:  # not all in the checkpoint's tensors: zeros
                        for kind in ("exp_avg", "exp_avg_sq"):
                            if kind in states:
                                states[kind].zero_()
    return parts


def _owned_rows(st, off: int, start: int, end: int, param, states: dict) -> list:
    """Parts for the owned flat range [start, end) of ``param`` inside its view ``st`` at ``off``."""
    a, b = max(start, off), min(end, off + st.data.numel())
    if a >= b:
        return []
    row = 1
    for n in st.local_shape[1:]:
        row *= n
    r0, r1 = (a - off) // row, -(-(b - off) // row)
    region = _target_region(st)
    rows = ((region[0][0] + r0, region[0][0] + r1),) + region[1:]
    flat = (a - off - r0 * row, b - off - r0 * row)
    parts = []
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        if kind not in states:
            continue
        dest = states[kind].view(-1)[a - start:b - start]
        if kind == "param" and _shares_memory(dest, param):
            continue  # an fp32 model: the master shard is the model weight, written as the model part
        parts.append(TargetPart(f"{OPT_PREFIX}{kind}.{st.key}", _layer_of(st), rows, "optim", dest, flat,
                                lambda p=param, a=a, b=b: p.detach().view(-1)[a:b]))
    return parts


def _shares_memory(view: torch.Tensor, param) -> bool:
    start = param.data_ptr()
    return start <= view.data_ptr() < start + param.numel() * param.element_size()


def model_space_optimizer_parts(optimizer, model_chunks, model_sts: list) -> tuple:
    """Parts for an optimizer that is not distributed: its model-space ShardedTensors, loaded into
    the optimizer afterwards (:func:`load_grown_optimizer`)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    from megatron_staged.checkpoint.manager import model_sharded_state_dict, sharding_metadata

    model_sd = model_sharded_state_dict(model_chunks)
    merged = model_sd["model"] if len(model_sd) == 1 else model_sd  # chunks' local keys coincide: keep them nested
    raw = optimizer.sharded_state_dict(merged, is_loading=True, metadata=sharding_metadata())
    opt = load_preprocess(raw)  # (sharded dict, non-persistent part, factories)
    by_region = {(st.key, tuple(st.global_offset)): st for st in model_sts}
    parts = []
    for st in (v for v in nested_values(opt[0]) if isinstance(v, ShardedTensor)):
        model = by_region.get((split_state_key(st.key)[1], tuple(st.global_offset)))
        parts.append(TargetPart(st.key, _layer_of(st), _target_region(st), "optim", st.data,
                                model_init=None if model is None else (lambda m=model: m.data)))
    return parts, opt


def load_grown_optimizer(optimizer, opt) -> None:
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges

    from megatron_staged.checkpoint.manager import load_optimizer_state

    opt_sd, nonpersistent, factories = opt
    loaded = dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, opt_sd)
    merge(loaded, nonpersistent)
    load_optimizer_state(optimizer, apply_factory_merges(loaded, factories), 0)


# ---- planning and filling --------------------------------------------------------------------------

@dataclass
class PartPlan:
    """How one target part is filled: ``action`` is ``grow`` (from ``source_key`` of source
    ``src_layer``), ``zero`` (an identity or ``zero`` layer's residual output, or a fresh layer's moment),
    ``keep`` (a fresh layer's weight keeps the target's init) or ``model`` (the optimizer's fp32
    copy of a fresh weight: the model's init)."""
    part: TargetPart
    kind: str
    model_key: str
    action: str
    source_key: Optional[str] = None
    src_layer: Optional[int] = None
    rule: object = None
    source_shape: tuple = ()
    pieces: tuple = ()

    def source_box(self, box: tuple) -> tuple:
        """A box of one source layer as a box of the stored (layer-stacked) tensor."""
        return box if self.src_layer is None else ((self.src_layer, self.src_layer + 1),) + box

    def requests(self) -> list:
        return [(self.source_key, self.source_box(p.source)) for p in self.pieces if p.source is not None]


def _fresh(part: TargetPart, kind: str, mkey: str) -> PartPlan:
    action = "keep" if part.where == "model" else ("model" if kind == "param" else "zero")
    return PartPlan(part, kind, mkey, action)


def plan_part(part: TargetPart, global_shape: tuple, spec: GrowthSpec, old_model_cfg, shapes: dict) -> PartPlan:
    """What target part ``part`` (of target layer ``part.layer``, -1 outside the stack) is made of."""
    kind, mkey = split_state_key(part.key)
    src_layer = None
    if part.layer >= 0:
        src_layer = spec.depth_map[part.layer]
        new = spec.new_layer[part.layer]
        if new and spec.depth_init == "identity" and is_residual_output(mkey):
            return PartPlan(part, kind, mkey, "zero")  # also a fresh ('new') layer's: the layer is an identity
        if src_layer is None or (new and spec.depth_init in FRESH_INITS):
            if fresh_layer_is_zero(mkey, spec.depth_init):
                return PartPlan(part, kind, mkey, "zero")  # param, fp32 master and moments alike
            return _fresh(part, kind, mkey)
    ckey = _source_key(kind, mkey, shapes)
    if ckey is None:  # not in the source: as a fresh layer's tensor
        return _fresh(part, kind, mkey)
    source_shape = tuple(shapes[ckey][1:] if src_layer is not None else shapes[ckey])
    rule = None
    if spec.width_factor == 2:
        m = old_model_cfg
        rule = width_rule(mkey, kind, len(source_shape), swiglu=bool(m.swiglu),
                          tied=not m.untie_embeddings_and_output_weights, alpha=spec.width_split)
    if grown_shape(rule, source_shape) != tuple(global_shape):
        raise RuntimeError(f"growth gives {grown_shape(rule, source_shape)} for {part.key}, "
                           f"target expects {tuple(global_shape)}")
    pieces = tuple(width_pieces(rule, source_shape, part.region))
    return PartPlan(part, kind, mkey, "grow", ckey, src_layer, rule, source_shape, pieces)


def fill_part(plan: PartPlan, fetched: dict, spec: GrowthSpec) -> None:
    """Write one target part from its plan and the fetched source boxes."""
    part = plan.part
    if plan.action == "keep":
        return
    if plan.action == "zero":
        part.dest.zero_()
        return
    if plan.action == "model":
        part.dest.copy_(part.model_init().reshape(part.dest.shape))
        return

    def read(box):
        t = fetched[(plan.source_key, plan.source_box(box))]
        return t if plan.src_layer is None else t[0]

    # noise (if any) is seeded by the source layer: every copy of a layer gets the same
    out = part.region_view()
    values = grow_region(plan.model_key, plan.kind, plan.rule, plan.source_shape, part.region, read,
                         noise_std=spec.width_noise, seed=spec.seed,
                         layer=-1 if plan.src_layer is None else plan.src_layer, device=part.dest.device, out=out)
    if out is None:
        part.write(values)


def target_parts(model_chunks, optimizer) -> tuple:
    """This rank's target parts (model, then optimizer), their tensors' global shapes by key, and
    what loading a non-distributed optimizer needs afterwards (None otherwise)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sts, parts = model_parts(model_chunks)
    shapes = {st.key: tuple(st.global_shape[st.prepend_axis_num:]) for st in sts}
    opt = None
    if optimizer is not None:
        inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
        if all(isinstance(o, DistributedOptimizer) for o in inner):
            parts += distributed_optimizer_parts(optimizer, model_chunks, sts)
        else:
            opt_parts, opt = model_space_optimizer_parts(optimizer, model_chunks, sts)
            parts += opt_parts
    for part in parts:
        if part.where == "optim":
            shapes.setdefault(part.key, shapes[split_state_key(part.key)[1]])
    return parts, shapes, opt


SLOT_KINDS = ("param", "exp_avg", "exp_avg_sq")


def slot_group(kind: str) -> int:
    """Which pass over the layers fills state ``kind`` (weights and fp32 masters, then each moment;
    any other state last)."""
    return SLOT_KINDS.index(kind) if kind in SLOT_KINDS else len(SLOT_KINDS)


@torch.no_grad()
def grow_sharded_state(source, spec: GrowthSpec, old_model_cfg, model_chunks, optimizer) -> dict:
    """Fill this rank's target model and optimizer shards from ``source`` (a
    :class:`~megatron_staged.growth.sources.CheckpointSource` or ``LiveSource``, or a checkpoint
    directory). Must be called on every rank. Returns this rank's statistics: seconds, bytes moved
    (read from storage or received) and copied locally, and the bytes of its target shards.
    """
    from megatron_staged.growth.sources import CheckpointSource, return_freed_memory

    t0 = time.time()
    if isinstance(source, str):
        source = CheckpointSource(source)
    parts, target_shapes, opt = target_parts(model_chunks, optimizer)

    from megatron_staged.model.builder import global_layers
    from megatron_staged.runtime.distributed import all_reduce_scalar

    # this rank's target layers: its pipeline stage's, or under interleaved 1F1B the union over its
    # virtual stages (megatron's own layer offsets); uneven pipeline stages hold different counts
    layers = [-1] + global_layers(model_chunks)
    planned = [plan_part(p, target_shapes[p.key], spec, old_model_cfg, source.shapes) for p in parts]
    # one slot per (state kind, layer), kind by kind: a slot moves one kind of one layer (a third of
    # what a whole layer would); every rank walks the same number of slots (a source's fetch may be
    # collective), so a rank with fewer layers ends with empty ones
    slots = [(group, layer) for group in range(len(SLOT_KINDS) + 1) for layer in layers]
    plans = [[pl for pl in planned if pl.part.layer == layer and slot_group(pl.kind) == group]
             for group, layer in slots]
    plans += [[] for _ in range(int(all_reduce_scalar(len(plans), "max")) - len(plans))]
    del planned
    needed = [list(dict.fromkeys(r for p in slot for r in p.requests())) for slot in plans]
    # interleaved copies read the same source layer in consecutive slots: keep it, fetch it once
    fresh = [[r for r in needed[i] if i == 0 or r not in set(needed[i - 1])] for i in range(len(needed))]
    source.prepare(fresh)
    t_plan = time.time() - t0
    kept: dict = {}
    for i, slot_plans in enumerate(plans):
        fetched = kept
        fetched.update(source.fetch(i))
        for plan in slot_plans:
            fill_part(plan, fetched, spec)
        following = set(needed[i + 1]) if i + 1 < len(needed) else set()
        kept = {r: t for r, t in fetched.items() if r in following}
        del fetched
        plans[i] = None
        return_freed_memory()  # this slot's temporaries
    del kept
    source.close()
    if opt is not None:
        load_grown_optimizer(optimizer, opt)
    target_bytes = sum(p.dest.numel() * p.dest.element_size() for p in parts)
    return dict(source.stats, seconds=time.time() - t0, plan_seconds=t_plan, target_bytes=target_bytes,
                bytes_read=source.stats["bytes_moved"])
