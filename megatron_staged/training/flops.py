"""Model FLOPs per iteration, Megatron-LM's formula.

Megatron-LM (training.py, ``num_floating_point_operations``; Narayanan et al. 2021, appendix):
each GEMM runs 3 times (forward, weight grad, data grad), multiply-add = 2 flops, and the terms
are attention projections (with GQA's smaller K/V), attention scores/values (the ``s/h`` term),
the MLP (x3/2 with SwiGLU's third matrix) and the logits. Written as a sum over layers plus the
logit term so that a zero-layer model is counted too (Megatron's form divides by num_layers).
"""
from __future__ import annotations

from megatron_staged.config import ModelConfig


def flops_per_iteration(m: ModelConfig, global_batch_size: int, num_layers: int | None = None) -> float:
    """Model FLOPs of one training iteration (forward + backward) over the global batch.

    ``num_layers`` overrides the count, e.g. for the expected active depth of a subnetwork.
    """
    L = m.num_layers if num_layers is None else num_layers
    B, s, h = global_batch_size, m.seq_length, m.hidden_size
    q_ratio = m.kv_channels * m.num_attention_heads / h
    gated = 1.5 if m.swiglu else 1.0
    per_layer = h * h * (
        (1 + m.num_query_groups / m.num_attention_heads + s / h) * q_ratio
        + (m.ffn_hidden_size / h) * gated
    )
    expansion = 3 * 2 * 2
    logits = m.padded_vocab_size * h / 2.0
    return float(expansion * B * s * (L * per_layer + logits))
