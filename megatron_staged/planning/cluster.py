"""Cluster planning: for each stage of a run, a TP x PP x DP that fits the GPUs, its memory per GPU,
and the predicted throughput and time.

Layout rule (what a Megatron user would pick by hand): the smallest TP, then the smallest PP, whose
estimated peak memory fits ``--gpu-memory-gb`` less ``--reserved-memory-gb``; TP stays within a
node (divides ``--gpus-per-node``), PP divides the layer count, DP = GPUs / (TP x PP), and the
layout must pass the trainer's own checks (heads, KV groups, FFN and vocabulary split over TP,
global batch over micro batch x DP). Depth growth therefore shows as added pipeline stages (more
layers, same activations per GPU) and width growth as added tensor shards (activations grow and
only TP divides them).

Throughput: tokens/s = MFU x peak FLOP/s x GPUs / (model FLOPs per token), with FLOPs per token
from ``training/flops.py`` (Megatron-LM's formula, the one the trainer logs TFLOP/s with).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_staged.config import Config, retarget_pipeline_split, validate
from megatron_staged.errors import UserError
from megatron_staged.planning.memory import GIB, RECOMPUTE_GRANULARITIES, MemoryEstimate, Recompute, estimate_memory
from megatron_staged.planning.recipe import PlannedStage
from megatron_staged.training.flops import flops_per_iteration


@dataclass
class Hardware:
    gpus: int
    gpus_per_node: int = 8
    gpu_memory_gb: Optional[float] = 80.0   # GiB per GPU; None: do not check fit
    reserved_memory_gb: float = 4.0         # CUDA context, NCCL buffers, allocator fragmentation
    mfu: float = 0.40
    peak_tflops: float = 989.0              # H100 SXM dense bf16

    @property
    def budget_bytes(self) -> Optional[float]:
        if self.gpu_memory_gb is None:
            return None
        return (self.gpu_memory_gb - self.reserved_memory_gb) * GIB


@dataclass
class StagePlan:
    stage: PlannedStage
    tp: int
    pp: int
    dp: int
    memory: MemoryEstimate
    fits: Optional[bool]
    flops_per_token: float
    tokens_per_second: float

    @property
    def microbatches(self) -> int:
        t = self.stage.cfg.training
        return t.global_batch_size // (t.micro_batch_size * self.dp)

    @property
    def days(self) -> float:
        return self.stage.tokens / self.tokens_per_second / 86400.0


def with_layout(cfg: Config, tp: int, pp: int) -> Config:
    """``cfg`` at TP x PP (an uneven pipeline split kept only at the configured PP size)."""
    new = cfg.copy()
    new.parallel.tensor_model_parallel_size = tp
    retarget_pipeline_split(new, pp)
    return new


def layout_is_valid(cfg: Config, gpus: int) -> bool:
    """The trainer's own layout checks (config.validate) plus the vocabulary split."""
    try:
        validate(cfg.copy(), gpus)
    except UserError:
        return False
    return cfg.model.padded_vocab_size % cfg.parallel.tensor_model_parallel_size == 0


def candidate_layouts(cfg: Config, hw: Hardware):
    """(TP, PP) in the order tried: TP ascending within a node, then PP ascending over layer divisors."""
    L = cfg.model.num_layers
    for tp in range(1, hw.gpus_per_node + 1):
        if hw.gpus_per_node % tp or hw.gpus % tp:
            continue
        for pp in range(1, max(L, 1) + 1):
            if (pp != 1 and not L) or hw.gpus % (tp * pp):
                continue  # (the layer split is validate's to check: uneven stages may hold it)
            if layout_is_valid(with_layout(cfg, tp, pp), hw.gpus):
                yield tp, pp


def plan_stage(stage: PlannedStage, hw: Hardware, recompute: Recompute, tp: int, pp: int) -> StagePlan:
    cfg = stage.cfg
    dp = hw.gpus // (tp * pp)
    mem = estimate_memory(cfg, tp, pp, dp, recompute)
    budget = hw.budget_bytes
    t = cfg.training
    from megatron_staged.subnet.schedule import mean_active_layers

    active = mean_active_layers(cfg, stage.start_iteration, stage.end_iteration)  # RaPTr / PLD: layers that run
    fpt = (flops_per_iteration(cfg.model, t.global_batch_size, num_layers=active)
           / (t.global_batch_size * cfg.model.seq_length))
    tps = hw.mfu * hw.peak_tflops * 1e12 * hw.gpus / fpt
    return StagePlan(stage, tp, pp, dp, mem, None if budget is None else mem.total <= budget, fpt, tps)


def choose_layout(stage: PlannedStage, hw: Hardware, recompute: Recompute) -> Optional[StagePlan]:
    """The first candidate layout that fits, or None."""
    for tp, pp in candidate_layouts(stage.cfg, hw):
        p = plan_stage(stage, hw, recompute, tp, pp)
        if p.fits:
            return p
    return None


def configured_plan(stage: PlannedStage, hw: Hardware, recompute: Recompute) -> StagePlan:
    p = stage.cfg.parallel
    return plan_stage(stage, hw, recompute, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)


# ---- report -------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if n / scale < 100 else f"{n / scale:.0f}{unit}"
    return f"{n:.0f}"


def gib(x: float) -> str:
    v = x / GIB
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def describe_run(stages: list[PlannedStage], hw: Hardware, recompute: Recompute) -> str:
    cfg = stages[0].cfg
    m, t, p = cfg.model, cfg.training, cfg.parallel
    prec = "bf16" if m.bf16 else ("fp16" if m.fp16 else "fp32")
    opt = ("distributed optimizer (fp32 main params + moments sharded over DP)"
           if p.use_distributed_optimizer else "optimizer state replicated on every DP rank")
    mem = "fit not checked" if hw.gpu_memory_gb is None else (
        f"{hw.gpu_memory_gb:g} GiB each, {hw.reserved_memory_gb:g} GiB reserved")
    return "\n".join([
        f"{hw.gpus} GPUs ({hw.gpus_per_node} per node), {mem}",
        f"model: {m.model_family}, seq {m.seq_length}, padded vocab {m.padded_vocab_size}, {prec}, "
        f"{cfg.optim.optimizer}, {opt}, sequence parallel {'on' if p.sequence_parallel else 'off'}",
        f"batch: micro {t.micro_batch_size}, global {t.global_batch_size} "
        f"({fmt_count(t.global_batch_size * m.seq_length)} tokens per iteration), {t.train_iters} iterations",
        f"activations (Korthikanti et al. 2022) for recompute none / selective / full; totals use: {recompute}",
    ])


def stage_table(stages: list[PlannedStage]) -> str:
    rows = []
    for s in stages:
        m = s.cfg.model
        rows.append([s.index, s.label, s.when or "-", f"{s.start_iteration}-{s.end_iteration}", fmt_count(s.tokens),
                     m.num_layers,
                     m.hidden_size, f"{m.num_attention_heads}/{m.num_query_groups}", m.ffn_hidden_size,
                     fmt_count(_total_params(s.cfg))])
    table = _table(["stage", "growth", "starts", "iterations", "tokens", "layers", "hidden", "heads/groups", "ffn",
                    "parameters"], rows)
    if any(s.when == "slope (assumed)" for s in stages):
        table += ("\n(a slope trigger's iteration is known only during the run: assumed halfway between the "
                  "previous stage and the next fixed iteration)")
    return table


def _total_params(cfg: Config) -> int:
    from megatron_staged.planning.memory import count_parameters

    return count_parameters(cfg.model).total


def layout_table(plans: list[StagePlan], configured: list[StagePlan]) -> str:
    rows = []
    prev = None
    for p, c in zip(plans, configured):
        change = ""
        if prev is not None:
            change = " ".join(x for x in (_change("PP", prev.pp, p.pp), _change("TP", prev.tp, p.tp)) if x)
        a = p.memory.activations
        rows.append([p.stage.index, p.tp, p.pp, p.dp, change, p.microbatches, fmt_count(p.memory.parameters),
                     gib(p.memory.weights), gib(p.memory.grads), gib(p.memory.optimizer),
                     "/".join(gib(a[r]) for r in RECOMPUTE_GRANULARITIES), gib(p.memory.total),
                     {True: "yes", False: "NO", None: "-"}[p.fits], f"TP{c.tp} PP{c.pp}"])
        prev = p
    return _table(["stage", "TP", "PP", "DP", "change", "micro-batches", "params/GPU", "weights", "grads",
                   "optimizer", "activations n/s/f", "total GiB", "fits", "configured"], rows)


def _change(name: str, old: int, new: int) -> str:
    """``+PP2`` for a growth by a whole factor, else ``PP2->5`` (a factor that is no integer, or a shrink)."""
    if new == old:
        return ""
    return f"+{name}{new // old}" if new > old and new % old == 0 else f"{name}{old}->{new}"


def _gflop(flops: float) -> str:
    """GFLOP with two decimals, or two significant digits below 0.01 (a tiny model is not 0.00)."""
    g = flops / 1e9
    return f"{g:.2f}" if g >= 0.01 or g == 0 else f"{g:.2g}"


def throughput_table(plans: list[StagePlan], hw: Hardware) -> str:
    flops = [p.flops_per_token * p.stage.tokens for p in plans]
    rows = [[p.stage.index, _gflop(p.flops_per_token), f"{p.tokens_per_second:,.0f}",
             f"{p.tokens_per_second / hw.gpus:,.0f}", fmt_count(p.stage.tokens), f"{f:.3g}",
             f"{100 * f / sum(flops):.1f}%", _days(p.days)] for p, f in zip(plans, flops)]
    rows.append(["all", "", "", "", fmt_count(sum(p.stage.tokens for p in plans)), f"{sum(flops):.3g}", "100%",
                 _days(sum(p.days for p in plans))])
    return _table(["stage", "GFLOP/token", "tokens/s", "tokens/s/GPU", "tokens", "FLOPs", "share", "days"], rows)


def _days(d: float) -> str:
    return f"{d:.2f}" if d >= 0.1 else f"{d:.2g}"


def yaml_hint(plans: list[StagePlan]) -> str:
    first = plans[0]
    lines = [f"  --tensor-model-parallel-size {first.tp} --pipeline-model-parallel-size {first.pp}", "  staging:",
             "    stages:"]
    for p in plans[1:]:
        keys = {k: v for k, v in p.stage.growth.items()
                if k not in ("target_tensor_model_parallel_size", "target_pipeline_model_parallel_size")}
        keys.update(target_tensor_model_parallel_size=p.tp, target_pipeline_model_parallel_size=p.pp)
        lines.append("      - {" + ", ".join(f"{k}: {v}" for k, v in keys.items()) + "}")
    return "\n".join(lines)


def cluster_report(stages: list[PlannedStage], hw: Hardware, recompute: Recompute) -> tuple[str, list[StagePlan]]:
    """The plan as text, and the chosen StagePlans (raises UserError when a stage fits nowhere)."""
    plans, configured = [], []
    for s in stages:
        p = choose_layout(s, hw, recompute)
        if p is None:
            hints = list(RECOMPUTE_GRANULARITIES[RECOMPUTE_GRANULARITIES.index(recompute.granularity) + 1:])
            ways = ["more GPUs"] + (["a smaller micro batch"] if s.cfg.training.micro_batch_size > 1 else []) + \
                [f"--recompute-granularity {h}" for h in hints[:1]]
            raise UserError(f"stage {s.index} ({s.cfg.model.num_layers} layers, hidden {s.cfg.model.hidden_size}) "
                            f"fits no TP<={hw.gpus_per_node} x PP layout of {hw.gpus} GPUs with "
                            f"{hw.gpu_memory_gb:g} GiB each; use " + (", ".join(ways[:-1]) + " or " + ways[-1]
                                                                       if len(ways) > 1 else ways[0]))
        plans.append(p)
        configured.append(configured_plan(s, hw, recompute))
    text = "\n\n".join([
        describe_run(stages, hw, recompute), stage_table(stages),
        "layout per stage (smallest TP, then PP, that fits; memory per GPU in GiB on the most loaded GPU)\n"
        + layout_table(plans, configured),
        f"throughput at MFU {hw.mfu:g} of {hw.peak_tflops:g} TFLOP/s per GPU (Megatron-LM's FLOPs formula)\n"
        + throughput_table(plans, hw),
        "these layouts as flags and YAML stages:\n" + yaml_hint(plans),
    ])
    return text, plans


def dry_run_report(stages: list[PlannedStage], hw: Hardware, recompute: Recompute) -> tuple[str, list[StagePlan]]:
    """Each stage at the layout the config gives it (what `train` would run)."""
    plans = [configured_plan(s, hw, recompute) for s in stages]
    text = "\n\n".join([
        describe_run(stages, hw, recompute), stage_table(stages),
        "configured layout per stage (memory per GPU in GiB on the most loaded GPU)\n"
        + layout_table(plans, plans),
        f"throughput at MFU {hw.mfu:g} of {hw.peak_tflops:g} TFLOP/s per GPU (Megatron-LM's FLOPs formula)\n"
        + throughput_table(plans, hw),
    ])
    return text, plans
