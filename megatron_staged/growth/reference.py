"""The growth operator on a whole, gathered training state in one process.

The specification the sharded engine must agree with: ``grow_global_state`` applies
:func:`megatron_staged.growth.engine.grown_global` to every tensor of a fully-read checkpoint
(stacked ``decoder.layers`` keys, ``optimizer.state.<kind>.<key>`` moments), with no parallel
layout anywhere. Tests compare grown checkpoints, written at any layout, against it.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_staged.growth.engine import OPT_PREFIX, grown_global, split_state_key
from megatron_staged.growth.spec import GrowthSpec


def read_checkpoint_tensors(ckpt_dir: str) -> dict:
    """Every tensor of a torch_dist checkpoint, full (global) size, in one process."""
    from megatron_staged.checkpoint.global_tensors import read_global_tensors

    return read_global_tensors(ckpt_dir)


def grow_global_state(src: dict, spec: GrowthSpec, old_model_cfg) -> dict:
    """Grown global tensors for every model/optimizer key of ``src``; None where not source-derived."""
    out: dict[str, Optional[torch.Tensor]] = {}
    for key in src:
        if not (key.startswith(OPT_PREFIX) or key.startswith(("embedding.", "decoder.", "output_layer."))):
            continue
        kind, mkey = split_state_key(key)

        def fetch(k, m, layer, _key=key):
            t = src[_key]
            return t if layer is None else t[layer]

        if mkey.startswith("decoder.layers."):
            layers = [grown_global(mkey, kind, j, spec, old_model_cfg, fetch) for j in range(spec.new_num_layers)]
            out[key] = None if any(t is None for t in layers) else torch.stack(layers)
            out[key + "#layers"] = layers
        else:
            out[key] = grown_global(mkey, kind, -1, spec, old_model_cfg, fetch)
    return out
