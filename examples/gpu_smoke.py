"""One-GPU smoke test of the fast path: a ~1B Llama-style model in bf16 trains N iterations, grows
depth x2 inside the run, trains N more. Prints TFLOP/s per GPU and MFU before and after growth,
the growth's seconds and peak GPU memory, and the eval loss just before and after the growth.

    python examples/gpu_smoke.py                 # 8 -> 16 layers, hidden 2048, seq 2048, bf16
    python examples/gpu_smoke.py --toy           # a few-MB model, runs anywhere (the CPU test)

Run by examples/gpu_smoke.sh; see docs/gpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

# ~1B at the end: Llama-style, hidden 2048, 16 heads, 8 KV groups, FFN 5504 (8/3 h), 8 -> 16 layers,
# untied 32000-token vocabulary: 0.50B parameters before growth, 0.87B after
FULL = ["--model-family", "llama", "--num-layers", "8", "--hidden-size", "2048", "--num-attention-heads", "16",
        "--group-query-attention", "--num-query-groups", "8", "--seq-length", "2048",
        "--micro-batch-size", "4", "--global-batch-size", "32", "--bf16", "--vocab-size", "32000",
        "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "20", "--lr-decay-style", "cosine",
        "--clip-grad", "1.0", "--weight-decay", "0.1", "--eval-iters", "4"]
TOY = ["--model-family", "llama", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
       "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--vocab-size", "256", "--lr", "1e-3", "--lr-warmup-iters", "2",
       "--eval-iters", "2"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny model (CPU test of this script's logic)")
    p.add_argument("--iters", type=int, default=None, help="iterations per phase (default 100; toy 4)")
    p.add_argument("--skip", type=int, default=None, help="warm-up iterations left out of each phase's "
                   "throughput (default 10; toy 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args, train_flags = p.parse_known_args(argv)
    iters = args.iters or (4 if args.toy else 100)
    skip = args.skip if args.skip is not None else (1 if args.toy else 10)

    import torch

    from megatron_staged import runtime
    from megatron_staged.config import parse_config
    from megatron_staged.growth.spec import GrowthRequest
    from megatron_staged.model.builder import count_parameters
    from megatron_staged.runtime import perf
    from megatron_staged.runtime.distributed import print_rank0
    from megatron_staged.training.flops import flops_per_iteration
    from megatron_staged.training.trainer import Trainer

    runtime.install()
    log = os.path.join(tempfile.mkdtemp(prefix="gpu_smoke_"), "log.jsonl")
    cfg = parse_config((TOY if args.toy else FULL) + ["--mock-data", "--train-iters", str(2 * iters),
                                                       "--exit-interval", str(iters), "--log-interval", "10",
                                                       "--progress-bar", "off", "--log-file", log] + train_flags)
    precision = "bf16" if cfg.model.bf16 else "fp16" if cfg.model.fp16 else "fp32"
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or perf.peak_tflops(device, precision)

    trainer = Trainer(cfg)
    world = trainer.world_size

    def phase(first, last):
        c = trainer.cfg
        flops = flops_per_iteration(c.model, c.training.global_batch_size)
        with open(log) as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        ph = perf.phase_from_records(records, first, last, flops, world, skip=skip)
        return {"layers": c.model.num_layers, "parameters": count_parameters(c)["total"],
                "ms_per_iteration": ph.ms_per_iteration, "tflops_per_gpu": ph.tflops_per_gpu,
                "mfu": ph.mfu(peak)}

    def peak_memory():
        if not cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    trainer.train()  # stops at --exit-interval
    before = dict(phase(1, iters), peak_memory_bytes=peak_memory())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    entry = trainer.grow(GrowthRequest(depth_factor=2))
    growth = {"seconds": entry["growth_seconds"], "peak_memory_bytes": peak_memory(),
              "eval_loss_before": entry["eval_loss_before"], "eval_loss_after": entry["eval_loss_after"],
              "verdict": perf.eval_loss_verdict(entry["eval_loss_before"], entry["eval_loss_after"], precision)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    after = dict(phase(iters + 1, 2 * iters), peak_memory_bytes=peak_memory())

    def mem(b):
        return "n/a (no GPU)" if b is None else f"{perf.gib(b):.1f} GiB"

    def line(name, ph):
        mfu = "n/a (unknown peak)" if ph["mfu"] is None else f"{100 * ph['mfu']:.1f}%"
        return (f"gpu_smoke {name}: {ph['layers']} layers, {ph['parameters'] / 1e9:.3g}B parameters | "
                f"{ph['ms_per_iteration']:.1f} ms/iteration | {ph['tflops_per_gpu']:.4g} TFLOP/s/GPU | "
                f"MFU {mfu} | peak memory {mem(ph['peak_memory_bytes'])}")

    print_rank0(f"gpu_smoke device: {device} | {precision} | peak "
                f"{'unknown (pass --peak-tflops)' if peak is None else f'{peak:g} TFLOP/s dense'} | "
                f"{world} GPU(s) | throughput over iterations {skip + 1}..{iters} of each phase")
    print_rank0(line("before growth", before))
    print_rank0(f"gpu_smoke growth: depth x2 in {growth['seconds']:.2f} s | peak memory {mem(growth['peak_memory_bytes'])} | "
                f"eval loss before {growth['eval_loss_before']:.6f} after {growth['eval_loss_after']:.6f} | "
                f"{growth['verdict']}")
    print_rank0(line("after growth", after))
    result = {"device": device, "precision": precision, "peak_tflops": peak, "before": before, "growth": growth,
              "after": after}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
