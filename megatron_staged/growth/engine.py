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

from megatron_staged.growth.operators import (grow_region, grow_width, grown_shape, identity_init,
                                              is_residual_output, width_pieces, width_rule)
from megatron_staged.growth.spec import GrowthSpec

OPT_PREFIX = "optimizer.state."


def split_state_key(key: str) -> tuple[str, str]:
    """'optimizer.state.exp_avg.decoder.x' -> ('exp_avg', 'decoder.x'); model keys -> ('param', key)."""
    if key.startswith(OPT_PREFIX):
        kind, model_key = key[len(OPT_PREFIX):].split(".", 1)
        return ("param" if kind in ("fp32_param", "param") else kind), model_key
    return "param", key


def _source_key(kind: str, model_key: str, available: set) -> Optional[str]:
    if kind == "param":
        # the distributed optimizer's fp32 master copy, else the model weight itself
        for k in (f"{OPT_PREFIX}param.{model_key}", f"{OPT_PREFIX}fp32_param.{model_key}", model_key):
            if k in available:
                return k
        return None
    k = f"{OPT_PREFIX}{kind}.{model_key}"
    return k if k in available else None


def grown_global(model_key: str, kind: str, layer: int, spec: GrowthSpec, old_model_cfg,
                 fetch: Callable[[str, str, Optional[int]], Optional[torch.Tensor]],
                 width_cache: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The grown global tensor of ``model_key`` (one layer's for layer keys) for state ``kind``.

    ``None`` means: not derived from the source (a fresh random layer: the target's own init for
    parameters, zeros for moments).
    """
    src_layer = None
    new = False
    if layer >= 0:
        src_layer = spec.depth_map[layer]
        new = spec.new_layer[layer]
        if src_layer is None or (new and spec.depth_init == "random"):
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


@dataclass
class ShardPlan:
    """How one target shard is filled: ``action`` is ``grow`` (from ``source_key`` of source
    ``src_layer``), ``zero`` (an identity layer's residual output, or a fresh layer's moment),
    ``keep`` (a fresh layer's weight keeps the target's init) or ``model`` (the optimizer's fp32
    copy of a fresh weight: the model's init)."""
    shard: object
    where: str
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


def plan_shard(st, where: str, layer: int, spec: GrowthSpec, old_model_cfg, shapes: dict) -> ShardPlan:
    """What target shard ``st`` (of target layer ``layer``, -1 outside the stack) is made of."""
    kind, mkey = split_state_key(st.key)
    src_layer = None
    if layer >= 0:
        src_layer = spec.depth_map[layer]
        new = spec.new_layer[layer]
        if src_layer is None or (new and spec.depth_init == "random"):
            fresh = "keep" if where == "model" else ("model" if kind == "param" else "zero")
            return ShardPlan(st, where, kind, mkey, fresh)
        if new and spec.depth_init == "identity" and is_residual_output(mkey):
            return ShardPlan(st, where, kind, mkey, "zero")
    ckey = _source_key(kind, mkey, shapes)
    if ckey is None:  # not in the source: as a fresh layer's tensor
        fresh = "keep" if where == "model" else ("model" if kind == "param" else "zero")
        return ShardPlan(st, where, kind, mkey, fresh)
    source_shape = tuple(shapes[ckey][1:] if src_layer is not None else shapes[ckey])
    rule = None
    if spec.width_factor == 2:
        m = old_model_cfg
        rule = width_rule(mkey, kind, len(source_shape), swiglu=bool(m.swiglu),
                          tied=not m.untie_embeddings_and_output_weights, alpha=spec.width_split)
    expect = tuple(st.global_shape[st.prepend_axis_num:])
    if grown_shape(rule, source_shape) != expect:
        raise RuntimeError(f"growth gives {grown_shape(rule, source_shape)} for {st.key}, target expects {expect}")
    pieces = tuple(width_pieces(rule, source_shape, _target_region(st)))
    return ShardPlan(st, where, kind, mkey, "grow", ckey, src_layer, rule, source_shape, pieces)


def fill_shard(plan: ShardPlan, fetched: dict, spec: GrowthSpec, model_by_region: dict) -> None:
    """Write one target shard from its plan and the fetched source boxes."""
    st = plan.shard
    if plan.action == "keep":
        return
    if plan.action == "zero":
        st.data.zero_()
        return
    if plan.action == "model":
        st.data.copy_(model_by_region[(plan.model_key, tuple(st.global_offset))].data.reshape(st.data.shape))
        return

    def read(box):
        t = fetched[(plan.source_key, plan.source_box(box))]
        return t if plan.src_layer is None else t[0]

    # noise (if any) is seeded by the source layer: every copy of a layer gets the same
    values = grow_region(plan.model_key, plan.kind, plan.rule, plan.source_shape, _target_region(st), read,
                         noise_std=spec.width_noise, seed=spec.seed,
                         layer=-1 if plan.src_layer is None else plan.src_layer)
    st.data.copy_(values.reshape(st.data.shape).to(st.data.dtype))


def target_shards(model_chunks, optimizer) -> tuple:
    """This rank's target ShardedTensors (model, then optimizer) and what loading them needs."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    from megatron_staged.checkpoint.manager import model_sharded_state_dict, sharding_metadata
    from megatron_staged.model.builder import iter_sharded_tensors

    model_sd = model_sharded_state_dict(model_chunks)
    model_sts = [st for v in model_sd.values() for st in iter_sharded_tensors(v)]
    merged = {}
    for v in model_sd.values():
        merged.update(v)
    opt = None
    opt_sts = []
    if optimizer is not None:
        raw = optimizer.sharded_state_dict(merged, is_loading=True, metadata=sharding_metadata())
        opt = load_preprocess(raw)  # (sharded dict, non-persistent part, factories)
        opt_sts = [v for v in nested_values(opt[0]) if isinstance(v, ShardedTensor)]
    return [(st, "model") for st in model_sts] + [(st, "optim") for st in opt_sts], opt


def load_grown_optimizer(optimizer, opt) -> None:
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges

    from megatron_staged.checkpoint.manager import load_optimizer_state

    opt_sd, nonpersistent, factories = opt
    loaded = dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, opt_sd)
    merge(loaded, nonpersistent)
    load_optimizer_state(optimizer, apply_factory_merges(loaded, factories), 0)


@torch.no_grad()
def grow_sharded_state(source, spec: GrowthSpec, old_model_cfg, model_chunks, optimizer) -> dict:
    """Fill this rank's target model and optimizer shards from ``source`` (a
    :class:`~megatron_staged.growth.sources.CheckpointSource` or ``LiveSource``, or a checkpoint
    directory). Must be called on every rank. Returns this rank's statistics: seconds, bytes moved
    (read from storage or received) and copied locally, and the bytes of its target shards.
    """
    from megatron.core import parallel_state as ps

    from megatron_staged.growth.sources import CheckpointSource

    t0 = time.time()
    if isinstance(source, str):
        source = CheckpointSource(source)
    targets, opt = target_shards(model_chunks, optimizer)
    model_by_region = {(st.key, tuple(st.global_offset)): st for st, where in targets if where == "model"}

    per_stage = spec.new_num_layers // ps.get_pipeline_model_parallel_world_size()
    first_layer = ps.get_pipeline_model_parallel_rank() * per_stage
    slots = [-1] + [first_layer + i for i in range(per_stage)]
    plans = [[plan_shard(st, where, layer, spec, old_model_cfg, source.shapes)
              for st, where in targets if _layer_of(st) == layer] for layer in slots]
    needed = [list(dict.fromkeys(r for p in slot for r in p.requests())) for slot in plans]
    # interleaved copies read the same source layer in consecutive slots: keep it, fetch it once
    fresh = [[r for r in needed[i] if i == 0 or r not in set(needed[i - 1])] for i in range(len(needed))]
    source.prepare(fresh)
    t_plan = time.time() - t0
    kept: dict = {}
    for i, slot_plans in enumerate(plans):
        fetched = {r: kept[r] for r in needed[i] if r in kept}
        fetched.update(source.fetch(i))
        for plan in slot_plans:
            fill_shard(plan, fetched, spec, model_by_region)
        kept = fetched
    del kept, fetched
    source.close()
    if optimizer is not None:
        load_grown_optimizer(optimizer, opt)
    target_bytes = sum(st.data.numel() * st.data.element_size() for st, _ in targets)
    return dict(source.stats, seconds=time.time() - t0, plan_seconds=t_plan, target_bytes=target_bytes,
                bytes_read=source.stats["bytes_moved"])
