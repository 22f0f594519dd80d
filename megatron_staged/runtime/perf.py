"""Throughput, model FLOPs utilisation (MFU) and memory figures of a run, from its per-iteration log.

MFU = achieved model FLOP/s per GPU / the GPU's peak dense FLOP/s for the run's precision. Model
FLOPs are Megatron-LM's count (:mod:`megatron_staged.training.flops`: 3 GEMM passes, attention
scores, logits; recomputation not counted), so the figure is comparable to Megatron-LM's reports
(e.g. 47% MFU for a 7B model on H100). Peaks are the vendors' dense (not 2:4 sparse) figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

# dense bf16/fp16 tensor-core peak, TFLOP/s, by marketing name (matched against
# torch.cuda.get_device_name(); the first match wins, so specific names come first)
PEAK_TFLOPS_16BIT = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),          # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
)

# identity depth growth adds exact zeros to the residual stream, so the eval loss should not
# move at all; in bf16 a kernel choice that changes with the shapes may round the logits
# differently, by at most about one bf16 ulp (2^-8 relative), which moves a cross-entropy loss
# of order 1-10 by well under 1%.
BF16_EVAL_LOSS_REL_TOLERANCE = 1e-2


def peak_tflops(device_name: Optional[str], precision: str) -> Optional[float]:
    """Peak dense TFLOP/s of one GPU for ``precision`` ('bf16' or 'fp16'); None if unknown."""
    if not device_name or precision not in ("bf16", "fp16"):
        return None
    for key, peak in PEAK_TFLOPS_16BIT:
        if key.lower() in device_name.lower():
            return peak
    return None


@dataclass
class Phase:
    """Throughput of a span of iterations."""
    iterations: int
    seconds: float
    model_flops: float
    world_size: int

    @property
    def ms_per_iteration(self) -> float:
        return 1e3 * self.seconds / self.iterations

    @property
    def tflops_per_gpu(self) -> float:
        return self.model_flops / self.seconds / self.world_size / 1e12

    def mfu(self, peak: Optional[float]) -> Optional[float]:
        return None if not peak else self.tflops_per_gpu / peak


def phase_from_records(records: Iterable[dict], first: int, last: int, flops_per_iteration: float,
                       world_size: int, skip: int = 0) -> Phase:
    """The phase of iterations ``first..last`` (inclusive) of a JSON-lines log (``--log-file``),
    dropping its first ``skip`` iterations (allocator and kernel warm-up)."""
    its = [r for r in records if "elapsed_ms" in r and first + skip <= r["iteration"] <= last]
    if not its:
        raise ValueError(f"no timed iterations in {first + skip}..{last}")
    seconds = sum(r["elapsed_ms"] for r in its) / 1e3
    return Phase(iterations=len(its), seconds=seconds, model_flops=flops_per_iteration * len(its),
                 world_size=world_size)


def eval_loss_verdict(before: float, after: float, precision: str) -> str:
    """'OK' or 'FAIL' for an exact (identity) growth's eval loss change, with the tolerance used."""
    tol = BF16_EVAL_LOSS_REL_TOLERANCE if precision in ("bf16", "fp16") else 1e-5
    rel = abs(after - before) / max(abs(before), 1e-12)
    return f"{'OK' if rel <= tol else 'FAIL'} (relative {rel:.1e}, tolerance {tol:.0e} in {precision})"


def gib(n_bytes: float) -> float:
    return n_bytes / 2 ** 30
