"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, for megatron's layer spec.

Without Transformer Engine, megatron-core's local spec computes attention with
``DotProductAttention``: an explicit ``[b*np, sq, sk]`` score matrix, a masked softmax and a
second batched matmul, i.e. memory quadratic in the sequence length. :class:`SDPAttention` has the
same constructor and ``forward`` signature (megatron's core-attention protocol) and calls torch's
fused SDPA, which picks flash / memory-efficient kernels on GPU. It is plugged in through the
spec (``self_attention.submodules.core_attention``), not by patching megatron.

Shapes (per tensor-parallel partition): query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``
(``ng`` query groups, GQA), output ``[sq, b, np*hn]``. A megatron attention mask is True where
attention is *not* allowed; with no mask and a causal layer the causal mask is implied.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F



class SDPAttention(torch.nn.Module):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state as ps

        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use Transformer Engine")
        if getattr(config, "window_size", None) is not None or getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPAttention supports full causal attention with a vanilla softmax only")
        self.config = config
        tp = pg_collection.tp.size() if pg_collection is not None else ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.hidden_size_per_partition = self.heads * self.head_dim
        # megatron's apply_query_key_layer_scaling divides the scores by layer_number and its softmax
        # multiplies them back (in fp32): the same function, so only the plain scale is needed
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attn_mask_type = attn_mask_type

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, hn]
        if self.groups != self.heads:
            # explicit K/V copies per query head (as DotProductAttention): SDPA's enable_gqa is not
            # taken by every fused kernel, and a fallback to the math kernel would cost far more
            rep = self.heads // self.groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None if attention_mask is None else ~attention_mask
        causal = mask is None and mask_type == AttnMaskType.causal
        p = self.dropout_p if self.training else 0.0
        if p > 0 and not self.config.sequence_parallel:
            with get_cuda_rng_tracker().fork():  # per-TP-rank stream, as DotProductAttention
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                     scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
