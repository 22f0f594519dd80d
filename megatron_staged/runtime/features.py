"""Optional accelerations, detected once at start and named in one log line.

Nothing here is required: on a machine without CUDA, Transformer Engine or apex the run uses
gloo, torch norms, torch's AdamW and megatron's local attention, and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a broken optional install counts as absent
        return None
    return str(getattr(mod, "__version__", "present"))


@dataclass(frozen=True)
class Features:
    cuda: bool
    device_name: Optional[str]
    transformer_engine: Optional[str]     # version, or None
    apex: bool
    apex_fused_layer_norm: bool
    adam: str                             # the Adam megatron-core imported: TE/apex FusedAdam or torch AdamW


def detect() -> Features:
    cuda = torch.cuda.is_available()
    try:
        import fused_layer_norm_cuda  # noqa: F401 - apex's CUDA extension
        fused_ln = True
    except Exception:  # noqa: BLE001
        fused_ln = False
    try:
        from megatron.core.optimizer import Adam

        adam = f"{Adam.__module__.split('.')[0]}.{Adam.__name__}"
    except Exception:  # noqa: BLE001
        adam = "unknown"
    return Features(cuda=cuda, device_name=torch.cuda.get_device_name() if cuda else None,
                    transformer_engine=_version("transformer_engine") if cuda else None,
                    apex=_version("apex") is not None, apex_fused_layer_norm=fused_ln, adam=adam)


def describe(cfg, features: Features, backend: str) -> str:
    """One line: device, backend, precision, layer spec, attention, norms, optimizer, overlap, recompute."""
    from megatron_staged.model.builder import attention_backend, use_transformer_engine

    m, p, r = cfg.model, cfg.parallel, cfg.performance
    precision = ("bf16" if m.bf16 else "fp16" if m.fp16 else "fp32") + (
        " (fp32 main params)" if (m.bf16 or m.fp16) else "")
    if m.fp16:
        o = cfg.optim
        precision += (f", loss scale {o.loss_scale:g}" if o.loss_scale else
                      f", dynamic loss scale from {o.initial_loss_scale:g}")
    te = use_transformer_engine(m)
    norms = ("TE fused" if te else "apex fused LayerNorm" if (features.apex_fused_layer_norm and features.cuda
                                                              and m.normalization == "LayerNorm") else "torch")
    recompute = "off" if not r.recompute_granularity else (
        r.recompute_granularity + (f"/{r.recompute_method}/{r.recompute_num_layers}"
                                   if r.recompute_granularity == "full" else ""))
    optimizer = features.adam
    if cfg.optim.optimizer in ("muon", "dist_muon"):
        optimizer = (f"{cfg.optim.optimizer} (2-D hidden weights; {features.adam} on the rest"
                     f"{', layer-wise over DP' if cfg.optim.optimizer == 'dist_muon' else ''})")
    return (f"features: device {features.device_name or 'cpu'} | backend {backend} | {precision} | "
            f"layer spec {'transformer_engine ' + features.transformer_engine if te else 'local'} | "
            f"attention {attention_backend(cfg)} | norms {norms} | optimizer {optimizer}"
            f"{' (distributed)' if p.use_distributed_optimizer else ''} | "
            f"sequence parallel {_sequence_parallel(p)} | "
            f"overlap grad reduce {'on' if p.overlap_grad_reduce else 'off'} | "
            f"overlap param gather {'on' if p.overlap_param_gather else 'off'} | recompute {recompute}")


def _sequence_parallel(p) -> str:
    """'on', 'off', or why --sequence-parallel is off now (TP 1, as Megatron-LM; on after a growth to TP > 1)."""
    from megatron_staged.config import sequence_parallel_active

    if sequence_parallel_active(p):
        return "on"
    return "off (TP1: --sequence-parallel takes effect at TP > 1)" if p.sequence_parallel else "off"
