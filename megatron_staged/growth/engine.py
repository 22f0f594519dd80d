"""Apply a growth to sharded training state: source checkpoint in, target shards filled.

Every rank builds the *target* model and optimizer at the target layout, asks them for their
sharded state dict (megatron ShardedTensors: key, global shape, this rank's offset), and fills each
of its target shards from the source slices it needs: for one target layer, that layer's source
layer (per key, per state kind), read from the source checkpoint with dist_checkpointing at any
offset, grown by :mod:`megatron_staged.growth.operators`, then sliced to the target shard. No rank
holds more than one layer's global tensors (per key) at a time, nor the whole model or optimizer.

Reads are collective (dist_checkpointing plans them over all ranks), so ranks walk the same
sequence of "slots": the non-layer tensors, then each local layer index in turn.

The same function serves ``megatron-staged grow`` (offline) and growth inside a running job.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from megatron_staged.growth.operators import grow_width, identity_init
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


class SourceCheckpoint:
    """Reads global slices (one layer of one key) of a torch_dist checkpoint, collectively."""

    def __init__(self, ckpt_dir: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = ckpt_dir
        meta = FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
        self.shapes = {k: (tuple(v.size), v.properties.dtype) for k, v in meta.items() if hasattr(v, "size")}

    def load(self, requests: dict) -> dict:
        """requests: name -> (checkpoint key, layer or None). Returns name -> tensor. Collective."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        if torch.distributed.get_world_size() == 1:
            return self._load_whole(requests)
        sd = {}
        for name, (ckey, layer) in requests.items():
            shape, dtype = self.shapes[ckey]
            if layer is None:
                sd[name] = ShardedTensor.from_rank_offsets(ckey, torch.empty(shape, dtype=dtype), replica_id=0)
            else:
                sd[name] = ShardedTensor.from_rank_offsets(
                    ckey, torch.empty(shape[1:], dtype=dtype), (0, layer, shape[0]), replica_id=0,
                    prepend_axis_num=1)
        loaded = dist_checkpointing.load(sd, self.dir, validate_access_integrity=False)
        return {name: loaded[name] for name in requests}

    def _load_whole(self, requests: dict) -> dict:
        """One process: megatron's torch_dist loader cannot read a partial tensor at world size 1
        (it places the other fragments on rank (rank+1) % world = itself), so read whole keys once."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        if not hasattr(self, "_whole"):
            self._whole = {}
        missing = {ckey for ckey, _ in requests.values()} - set(self._whole)
        if missing:
            sd = {k: ShardedTensor.from_rank_offsets(k, torch.empty(self.shapes[k][0], dtype=self.shapes[k][1]),
                                                     replica_id=0) for k in missing}
            loaded = dist_checkpointing.load(sd, self.dir, validate_access_integrity=False)
            self._whole.update({k: loaded[k] for k in missing})
        return {name: self._whole[ckey] if layer is None else self._whole[ckey][layer]
                for name, (ckey, layer) in requests.items()}


def _layer_of(st) -> int:
    return st.global_offset[0] if st.prepend_axis_num else -1


def _target_region(st) -> tuple:
    n = st.prepend_axis_num
    return tuple(slice(o, o + s) for o, s in zip(st.global_offset[n:], st.local_shape))


@torch.no_grad()
def grow_sharded_state(src_dir: str, spec: GrowthSpec, old_model_cfg, model_chunks, optimizer) -> dict:
    """Fill this rank's target model and optimizer shards from the source checkpoint.

    Returns statistics (bytes read, seconds). Must be called on every rank.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core import parallel_state as ps

    from megatron_staged.checkpoint.manager import sharding_metadata, load_optimizer_state, model_sharded_state_dict
    from megatron_staged.model.builder import iter_sharded_tensors

    t0 = time.time()
    source = SourceCheckpoint(src_dir)
    available = set(source.shapes)

    model_sd = model_sharded_state_dict(model_chunks)
    model_sts = [st for v in model_sd.values() for st in iter_sharded_tensors(v)]
    model_by_region = {(st.key, tuple(st.global_offset)): st for st in model_sts}
    merged = {}
    for v in model_sd.values():
        merged.update(v)
    opt_sd = None
    opt_sts = []
    if optimizer is not None:
        raw = optimizer.sharded_state_dict(merged, is_loading=True, metadata=sharding_metadata())
        opt_sd, nonpersistent, factories = load_preprocess(raw)
        opt_sts = [v for v in nested_values(opt_sd) if isinstance(v, ShardedTensor)]
    targets = [(st, "model") for st in model_sts] + [(st, "optim") for st in opt_sts]

    per_stage = spec.new_num_layers // ps.get_pipeline_model_parallel_world_size()
    first_layer = ps.get_pipeline_model_parallel_rank() * per_stage
    slots = [-1] + list(range(per_stage))
    bytes_read = 0
    width_cache: dict = {}  # the grown source layer of the previous slot (interleave reuses it)
    for slot in slots:
        layer = -1 if slot < 0 else first_layer + slot
        mine = [(st, where) for st, where in targets if _layer_of(st) == layer]
        src_layer = None if layer < 0 else spec.depth_map[layer]
        width_cache = {k: v for k, v in width_cache.items() if src_layer is not None and k[2] == src_layer}
        # what this slot needs from the source, deduplicated
        needed, cache = {}, {}
        for st, _ in mine:
            kind, mkey = split_state_key(st.key)
            if layer >= 0 and (src_layer is None or (spec.new_layer[layer] and spec.depth_init == "random")):
                continue
            ckey = _source_key(kind, mkey, available)
            if ckey is not None and (kind, mkey, src_layer) not in width_cache:
                needed[f"{ckey}@{src_layer}"] = (ckey, src_layer)
        loaded = source.load(needed)  # collective: every rank calls it once per slot
        bytes_read += sum(t.numel() * t.element_size() for t in loaded.values())

        def fetch(kind, mkey, src_layer):
            ckey = _source_key(kind, mkey, available)
            return None if ckey is None else loaded[f"{ckey}@{src_layer}"]

        for st, where in mine:
            kind, mkey = split_state_key(st.key)
            ck = (kind, mkey)
            if ck not in cache:
                cache[ck] = grown_global(mkey, kind, layer, spec, old_model_cfg, fetch, width_cache)
            full = cache[ck]
            if full is None:
                if where == "model":
                    continue  # a fresh layer keeps the target model's own (layout-independent) init
                if kind == "param":  # the optimizer's fp32 copy of a fresh layer: the model's init
                    src = model_by_region.get((mkey, tuple(st.global_offset)))
                    st.data.copy_(src.data.reshape(st.data.shape))
                else:
                    st.data.zero_()
                continue
            expect = tuple(st.global_shape[st.prepend_axis_num:])
            if tuple(full.shape) != expect:
                raise RuntimeError(f"growth produced {tuple(full.shape)} for {st.key}, target expects {expect}")
            st.data.copy_(full[_target_region(st)].reshape(st.data.shape).to(st.data.dtype))
        del loaded, cache

    if optimizer is not None:
        loaded_opt = dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, opt_sd)
        merge(loaded_opt, nonpersistent)
        loaded_opt = apply_factory_merges(loaded_opt, factories)
        load_optimizer_state(optimizer, loaded_opt, 0)
    return {"seconds": time.time() - t0, "bytes_read": bytes_read}
