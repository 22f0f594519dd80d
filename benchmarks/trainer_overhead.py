#!/usr/bin/env python
"""Iteration time of the project's trainer against a minimal loop written directly on megatron-core.

Run under torchrun (or as one plain process for TP1 PP1)::

    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore torchrun --nproc-per-node 4 \\
        benchmarks/trainer_overhead.py --iters 40 --warmup 5 --out-json /tmp/overhead.json --write-docs

Three loops run in the same processes, on the same model (the reference copies the trainer's
initial weights), the same layout and the same data (both read the project's data iterator over the
same dataset from sample 0):

* ``trainer.train_step``: ``Trainer(cfg).train_step()`` called repeatedly;
* ``trainer.train``: the full ``Trainer.train()`` loop (growth-stage check, bookkeeping, the
  per-iteration logger with its log line every ``--log-interval`` iterations);
* ``reference``: the minimal loop below, on megatron-core only (GPTModel + megatron DDP +
  get_megatron_optimizer + get_forward_backward_func + finalize_model_grads); the only project code
  it uses is the CPU backend (``runtime.cpu_backend.activate``) and the data iterator.

Measured iterations are split into blocks run in rotating order (A B C, then B C A, ...) so that
drift in machine load hits every loop alike. An iteration's time is the slowest rank's. The
reported overhead is median(trainer) / median(reference); the ratio of the per-round medians is
reported as well, with its spread, as a measure of the noise. Since both loops consume the same
batches from the same initial weights with the same optimizer settings, their losses at the same
iteration index should agree; the largest difference is reported as a correctness check.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
HEADING = "Trainer overhead"


from common import machine_info as common_machine_info, replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and layout (the same for both loops)")
    g.add_argument("--model-family", default="gpt2", choices=["gpt2"])
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=8)
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--vocab-size", type=int, default=1024, help="mock-data vocabulary (NullTokenizer)")
    g.add_argument("--tp", type=int, default=None, help="default: 2 on 4+ ranks, else 1")
    g.add_argument("--pp", type=int, default=None, help="default: 2 on 4+ ranks, else 1")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--log-interval", type=int, default=10, help="trainer.train's log line interval")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("measurement")
    g.add_argument("--iters", type=int, default=40, help="measured iterations per loop")
    g.add_argument("--warmup", type=int, default=5, help="unmeasured iterations per loop first")
    g.add_argument("--blocks", type=int, default=0,
                   help="rounds the measured iterations are split into (default: iters/2, i.e. blocks of 2 "
                        "iterations; short blocks cancel load changes best)")
    g.add_argument("--mode", default="both", choices=["step", "train", "both"],
                   help="trainer loop(s) to measure: train_step, train(), or both")
    g.add_argument("--out-json", default=None)
    g.add_argument("--write-docs", action="store_true", help=f"write the '{HEADING}' section of docs/benchmarks.md")
    g.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: (re)write the docs section from a saved --out-json result")
    g.add_argument("--docs", default=DOCS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the project's trainer ------------------------------------------------------------------------

def trainer_flags(a, tp: int, pp: int, train_iters: int) -> list[str]:
    """The `megatron-staged train` flags for this benchmark."""
    return ["--model-family", a.model_family, "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
            "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
            "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--mock-data", "--vocab-size", str(a.vocab_size), "--lr", str(a.lr), "--lr-decay-style", "constant",
            "--lr-warmup-iters", "0", "--weight-decay", str(a.weight_decay), "--clip-grad", str(a.clip_grad),
            "--train-iters", str(train_iters), "--log-interval", str(a.log_interval), "--progress-bar", "off",
            "--seed", str(a.seed), "--transformer-impl", "local"]


def build_trainer(a, tp: int, pp: int, train_iters: int):
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    flags = trainer_flags(a, tp, pp, train_iters)
    cfg = config_from_args(_train_parser("megatron-staged train").parse_args(flags))
    return Trainer(cfg), flags


# ---- the reference minimal loop (megatron-core only) ----------------------------------------------

class ReferenceLoop:
    """GPTModel + DDP + megatron optimizer + forward_backward_func + finalize_model_grads."""

    def __init__(self, a, padded_vocab_size: int, data_iterator, init_state_dict):
        import torch
        import torch.nn.functional as F
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer import TransformerConfig

        self.a = a
        tcfg = TransformerConfig(
            num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=4 * a.hidden_size,
            num_attention_heads=a.num_attention_heads, normalization="LayerNorm", layernorm_epsilon=1e-5,
            add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu,
            hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
            use_cpu_initialization=True, perform_initialization=True,
            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
            params_dtype=torch.float32, pipeline_dtype=torch.float32,
            bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
            deallocate_pipeline_outputs=False,
        )
        gpt = GPTModel(config=tcfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="LayerNorm"),
                       vocab_size=padded_vocab_size, max_sequence_length=a.seq_length,
                       pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                       share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute")
        gpt.load_state_dict(init_state_dict)  # the same initial weights as the trainer's model
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   overlap_param_gather=False, use_distributed_optimizer=False,
                                                   check_for_nan_in_grad=False)
        self.model = [DistributedDataParallel(tcfg, ddp_config, gpt)]
        ocfg = OptimizerConfig(optimizer="adam", lr=a.lr, min_lr=0.0, weight_decay=a.weight_decay,
                               adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, clip_grad=a.clip_grad,
                               bf16=False, fp16=False, params_dtype=torch.float32,
                               use_distributed_optimizer=False)
        self.optimizer = get_megatron_optimizer(ocfg, self.model)
        # constant LR and weight decay, no scheduler: set the per-group values once
        for group in self.optimizer.param_groups:
            group["lr"] = a.lr
            group["weight_decay"] = a.weight_decay * group.get("wd_mult", 1.0)
        tcfg.grad_scale_func = self.optimizer.scale_loss
        tcfg.finalize_model_grads_func = finalize_model_grads
        self.data_iterator = data_iterator
        self.fb = get_forward_backward_func()
        self.dp = ps.get_data_parallel_world_size()
        self.num_microbatches = a.global_batch_size // (a.micro_batch_size * self.dp)
        self.last_stage = ps.is_pipeline_last_stage()
        self.dp_group = ps.get_data_parallel_group()

    @staticmethod
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        loss_mask = batch["loss_mask"]
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output_tensor):
            mask = loss_mask.view(-1).float()
            loss = (output_tensor.float().view(-1) * mask).sum() / mask.sum()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    def step(self):
        import torch
        import torch.distributed as dist

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.fb(forward_step_func=self.forward_step, data_iterator=self.data_iterator, model=self.model,
                         num_microbatches=self.num_microbatches, seq_length=self.a.seq_length,
                         micro_batch_size=self.a.micro_batch_size, forward_only=False)
        self.optimizer.step()
        if not self.last_stage:
            return None
        # Megatron-LM's reporting: mean over micro batches, averaged over DP on the last stage
        loss = torch.stack([l["lm loss"] for l in losses]).mean()
        if self.dp > 1:
            dist.all_reduce(loss, group=self.dp_group)
            loss /= self.dp
        return float(loss)


# ---- measurement ----------------------------------------------------------------------------------

def machine_info(world: int) -> dict:
    return dict(common_machine_info(world), loadavg_start=list(os.getloadavg()))


def summarize(times: list[float]) -> dict:
    s = sorted(times)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"n": len(s), "median_ms": 1e3 * statistics.median(s), "mean_ms": 1e3 * statistics.fmean(s),
            "min_ms": 1e3 * s[0], "max_ms": 1e3 * s[-1], "iqr_ms": 1e3 * (q[2] - q[0]),
            "rel_iqr": (q[2] - q[0]) / statistics.median(s)}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.from_json:
        write_docs(a.docs, json.load(open(a.from_json)))
        print(f"wrote the '{HEADING}' section of {a.docs} from {a.from_json}")
        return 0
    import torch
    import torch.distributed as dist

    from megatron_staged.runtime.distributed import init_distributed

    init_distributed("auto")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = a.tp or (2 if world >= 4 else 1)
    pp = a.pp or (2 if world >= 4 else 1)
    loops = {"step": ["trainer.train_step"], "train": ["trainer.train"],
             "both": ["trainer.train_step", "trainer.train"]}[a.mode]
    loops = loops + ["reference"]
    blocks = max(1, min(a.blocks or a.iters // 2, a.iters))
    per_block = [a.iters // blocks + (1 if b < a.iters % blocks else 0) for b in range(blocks)]
    trainer_iters = (a.warmup + a.iters) * (len(loops) - 1)
    info = machine_info(world)

    from megatron.core import parallel_state as ps

    from megatron_staged.data import build_data_iterator

    trainer, flags = build_trainer(a, tp, pp, trainer_iters + 1)
    gpt = trainer.model[0]
    while hasattr(gpt, "module"):
        gpt = gpt.module
    ref_iter = build_data_iterator(trainer.datasets[0], 0, a.micro_batch_size, ps.get_data_parallel_rank(),
                                   ps.get_data_parallel_world_size())
    ref = ReferenceLoop(a, trainer.cfg.model.padded_vocab_size, ref_iter,
                        {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in gpt.state_dict().items()})
    for chunk in trainer.model + ref.model:
        chunk.train()
    n_params = sum(p.numel() for p in gpt.parameters())

    trainer_losses: list[float] = []
    ref_losses: list[float] = []

    def run_step(n):
        out = []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _, _ = trainer.train_step()
            out.append((time.perf_counter() - t0, time.process_time() - c0))
            trainer_losses.append(loss)
        return out

    def run_train(n):
        starts = []
        inner = trainer.train_step

        def timed_step():
            starts.append((time.perf_counter(), time.process_time()))
            return inner()

        trainer.train_step = timed_step
        trainer.cfg.training.train_iters = trainer.iteration + n
        h0 = len(trainer.loss_history)
        try:
            trainer.train()
        finally:
            del trainer.train_step  # back to the class's method
        end = (time.perf_counter(), time.process_time())
        trainer_losses.extend(l for _, l, _ in trainer.loss_history[h0:])
        return [(b[0] - s[0], b[1] - s[1]) for s, b in zip(starts, starts[1:] + [end])]

    def run_ref(n):
        out = []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = ref.step()
            out.append((time.perf_counter() - t0, time.process_time() - c0))
            ref_losses.append(loss)
        return out

    fns = {"trainer.train_step": run_step, "trainer.train": run_train, "reference": run_ref}
    # warmup (not measured), then rounds of blocks in rotating order
    for name in loops:
        dist.barrier()
        fns[name](a.warmup)
    times = {name: [] for name in loops}
    block_times = {name: [] for name in loops}
    t_start = time.time()
    for b, n in enumerate(per_block):
        order = loops[b % len(loops):] + loops[:b % len(loops)]
        for name in order:
            dist.barrier()
            ts = fns[name](n)
            times[name].extend(ts)
            block_times[name].append(ts)
    wall = time.time() - t_start
    info["loadavg_end"] = list(os.getloadavg())

    gathered = [None] * world
    dist.all_gather_object(gathered, {"times": times, "blocks": block_times, "last_stage": ps.is_pipeline_last_stage(),
                                      "ref_losses": ref_losses, "trainer_losses": trainer_losses})
    if rank == 0:
        result = report(a, info, flags, tp, pp, world, n_params, trainer, gathered, loops, per_block, wall)
        if a.out_json:
            with open(a.out_json, "w") as fh:
                json.dump(result, fh, indent=1)
        if a.write_docs:
            write_docs(a.docs, result)
            print(f"wrote the '{HEADING}' section of {a.docs}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def bootstrap_ratio_ci(x: list[float], y: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of median(x) / median(y) (iterations resampled independently)."""
    import random

    rnd = random.Random(seed)
    rs = sorted(statistics.median(rnd.choices(x, k=len(x))) / statistics.median(rnd.choices(y, k=len(y)))
                for _ in range(n))
    return rs[int(0.025 * n)], rs[int(0.975 * n) - 1]


def report(a, info, flags, tp, pp, world, n_params, trainer, gathered, loops, per_block, wall) -> dict:
    def per_iter(name, what):
        """Per-iteration wall time of the slowest rank (what=0) or CPU time summed over ranks (what=1)."""
        agg = max if what == 0 else sum
        n = len(gathered[0]["times"][name])
        return [agg(g["times"][name][i][what] for g in gathered) for i in range(n)]

    def per_round(name, what):
        agg = max if what == 0 else sum
        rounds = gathered[0]["blocks"][name]
        return [[agg(g["blocks"][name][b][i][what] for g in gathered) for i in range(len(rounds[b]))]
                for b in range(len(rounds))]

    out = {}
    for what, label in ((0, "wall"), (1, "cpu")):
        series = {name: per_iter(name, what) for name in loops}
        stats = {name: summarize(series[name]) for name in loops}
        rounds = {name: per_round(name, what) for name in loops}
        ratios = {}
        for name in loops[:-1]:
            pr = [statistics.median(x) / statistics.median(y) for x, y in zip(rounds[name], rounds["reference"])]
            q = statistics.quantiles(pr, n=4) if len(pr) >= 2 else [pr[0]] * 3
            lo, hi = bootstrap_ratio_ci(series[name], series["reference"])
            ratios[name] = {"ratio_of_medians": stats[name]["median_ms"] / stats["reference"]["median_ms"],
                            "ci95": [lo, hi],
                            "ratio_of_means": stats[name]["mean_ms"] / stats["reference"]["mean_ms"],
                            "per_round": pr, "per_round_median": statistics.median(pr),
                            "per_round_q1": q[0], "per_round_q3": q[2]}
        out[label] = {"stats": stats, "ratios": ratios}
    last = next(g for g in gathered if g["last_stage"])
    tl, rl = last["trainer_losses"], last["ref_losses"]
    k = min(len(tl), len(rl))
    diffs = [abs(x - y) for x, y in zip(tl[:k], rl[:k])]
    cmd = ("OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore "
           + (f"torchrun --nproc-per-node {world} " if world > 1 else "python ")
           + "benchmarks/trainer_overhead.py " + " ".join(sys.argv[1:]))
    result = {"command": cmd, "machine": info, "model": {"family": a.model_family, "num_layers": a.num_layers,
              "hidden_size": a.hidden_size, "num_attention_heads": a.num_attention_heads, "seq_length": a.seq_length,
              "micro_batch_size": a.micro_batch_size, "global_batch_size": a.global_batch_size,
              "padded_vocab_size": trainer.cfg.model.padded_vocab_size, "params_on_rank0": n_params,
              "tp": tp, "pp": pp, "dp": world // (tp * pp), "num_microbatches": trainer.num_microbatches},
              "trainer_flags": flags, "iters": a.iters, "warmup": a.warmup, "blocks": per_block,
              "measure_wall_s": wall, "wall": out["wall"], "cpu": out["cpu"],
              "loss_check": {"compared_iterations": k, "max_abs_diff": max(diffs) if diffs else None,
                             "identical": bool(diffs) and max(diffs) == 0.0,
                             "trainer_first_last": [tl[0], tl[k - 1]] if k else None}}
    print(f"\n== trainer overhead: {a.model_family} {a.num_layers} layers x {a.hidden_size}, seq {a.seq_length}, "
          f"micro batch {a.micro_batch_size}, global batch {a.global_batch_size}, TP{tp} PP{pp} "
          f"DP{world // (tp * pp)} on {world} rank(s); {len(per_block)} rounds", flush=True)
    for label, title in (("wall", "wall time per iteration (slowest rank)"),
                         ("cpu", "CPU time per iteration (sum over ranks)")):
        print(f"  -- {title}", flush=True)
        for name in loops:
            st = out[label]["stats"][name]
            print(f"  {name:20s} median {st['median_ms']:9.1f} ms  mean {st['mean_ms']:9.1f}  "
                  f"IQR {st['iqr_ms']:8.1f} ({100 * st['rel_iqr']:.1f}%)  n={st['n']}", flush=True)
        for name, r in out[label]["ratios"].items():
            print(f"  {name} / reference: {r['ratio_of_medians']:.4f} (medians, 95% CI {r['ci95'][0]:.3f}"
                  f"..{r['ci95'][1]:.3f}); per-round ratio median {r['per_round_median']:.4f} "
                  f"(IQR {r['per_round_q1']:.3f}..{r['per_round_q3']:.3f}); means {r['ratio_of_means']:.4f}"
                  f"  (goal <= 1.03)", flush=True)
    print(f"  loss check: {k} iterations compared, max |trainer - reference| = "
          f"{result['loss_check']['max_abs_diff']}", flush=True)
    print(f"  load average {info['loadavg_start']} -> {info['loadavg_end']}", flush=True)
    return result


# ---- docs -----------------------------------------------------------------------------------------

def write_docs(path: str, r: dict) -> None:
    m, mi = r["model"], r["machine"]

    def table(label):
        rows = []
        for name, st in r[label]["stats"].items():
            ratio = r[label]["ratios"].get(name)
            cells = (f"{ratio['ratio_of_medians']:.3f} | {ratio['ci95'][0]:.3f} .. {ratio['ci95'][1]:.3f} | "
                     f"{ratio['per_round_median']:.3f} ({ratio['per_round_q1']:.3f} .. {ratio['per_round_q3']:.3f})"
                     if ratio else "1 | | ")
            rows.append(f"| {name} | {st['median_ms']:.1f} | {st['mean_ms']:.1f} | {st['iqr_ms']:.1f} "
                        f"({100 * st['rel_iqr']:.0f}%) | {st['n']} | {cells} |")
        return ("| loop | median ms | mean ms | IQR ms | n | ratio of medians | 95% CI | per-round ratio, median (IQR) |\n"
                "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))

    lc = r["loss_check"]
    body = f"""\
Iteration time of the project's trainer (`Trainer.train_step()` called repeatedly, and the full
`Trainer.train()` loop with its logger) against a minimal loop written directly on megatron-core
(GPTModel + megatron DDP + `get_megatron_optimizer` + `get_forward_backward_func` +
`finalize_model_grads`, in `benchmarks/trainer_overhead.py` itself): same model, layout, initial
weights and data, measured in the same processes in short blocks of {r['blocks'][0]} iteration(s) run in
rotating order ({len(r['blocks'])} rounds). Ratio = trainer / reference; goal <= 1.03.

Command:

```
{r['command']}
```

Model: {m['family']}, {m['num_layers']} layers x hidden {m['hidden_size']}, {m['num_attention_heads']} heads,
seq {m['seq_length']}, micro batch {m['micro_batch_size']}, global batch {m['global_batch_size']}
({m['num_microbatches']} micro batches per iteration), padded vocab {m['padded_vocab_size']} (mock data), fp32,
TP{m['tp']} PP{m['pp']} DP{m['dp']}. {r['iters']} measured iterations per loop after {r['warmup']} warmup
iterations.

Machine: {mi['ranks']} rank(s) on {mi['cpu_cores_usable']} usable CPU core(s) ({mi['cpu_model']}),
OMP_NUM_THREADS={mi['omp_num_threads']}, torch {mi['torch']}, megatron-core {mi['megatron_core']},
Python {mi['python']}, {mi['date']}. Load average {', '.join(f'{x:.2f}' for x in mi['loadavg_start'])}
at the start, {', '.join(f'{x:.2f}' for x in mi['loadavg_end'])} at the end.

Wall time per iteration (the slowest rank's):

{table('wall')}

CPU time per iteration (summed over the ranks; less sensitive to other jobs on the machine than wall
time, and it shows any extra work the trainer does):

{table('cpu')}

Loss check: the trainer's and the reference's losses at the same iteration index (same batches, same
initial weights, same optimizer settings) differ by at most {lc['max_abs_diff']} over
{lc['compared_iterations']} iterations{' (bitwise identical: both loops do the same computation)' if lc['identical'] else ''}.

What the trainer does beyond the reference, per iteration: its forward step moves the batch with
`.to(device)` and builds a default loss mask; `average_loss_over_ranks` (training/trainer.py)
all-reduces the loss over *all* ranks (gloo, 16 bytes) where Megatron-LM only reduces over DP on the
last stage; `scheduler.step`; and in `train()` the bookkeeping and the logger (a log line every
`--log-interval` iterations). None of these touch the model's work, which the loss check shows
to be identical.

**Noise.** Measured on a shared, busy machine ({mi['ranks']} ranks on {mi['cpu_cores_usable']} cores while other
jobs were running; see the load average above). The IQR columns, the bootstrap 95% interval of
the ratio of medians and the spread of the per-round ratios show how much of any difference is
noise. The lead will re-run this on a quiet machine before relying on the figure.
"""
    replace_section(path, HEADING, body)


if __name__ == "__main__":
    sys.exit(main())
