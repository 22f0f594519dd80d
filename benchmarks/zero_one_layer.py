#!/usr/bin/env python
"""Zero/one-layer progressive training (Bu 2025): compute to reach a from-scratch model's loss.

One process (TP1 PP1), the trainer's own code path (``staging.stages`` with one expansion stage),
the built-in corpus through ``--builtin-corpus`` (the project's normal data path and split)::

    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore python benchmarks/zero_one_layer.py --write-docs
    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore python benchmarks/zero_one_layer.py --quick   # < 10 min

Runs, per seed, at the same token budget (``--train-iters`` x global batch x sequence) and the same
LR schedule (WSD: 2% warmup, stable, the last 10% decaying):

- ``scratch``: the L-layer target model from iteration 0;
- ``0->L``: a zero-layer model (embeddings, final norm, output layer) expanded to L layers at
  ``--at-fraction`` of the run (``depth_init: random``: the target's depth-scaled init, zero Adam
  moments), LR unchanged;
- ``1->L``: a one-layer model expanded the same way with ``depth_init: copy-stack``;
- ``0->L bc``: as ``0->L`` with ``fresh_moments: bias-corrected`` (the new layers' Adam moments
  start at zero and are bias-corrected from the expansion, as a fresh Adam would be);
- by name, also ``0->L zero``, ``1->L zero`` and ``1->L random``, and any of them ``@F``: expanded at F T.

Reported: the validation loss at the end, its gap to ``scratch`` (relative), the model FLOPs of the
whole run (Megatron's formula; evaluation not counted) and, where the curve gets there, the FLOPs
at the first evaluation whose loss is at or below ``scratch``'s final validation loss (interpolated
in (log FLOPs, loss) between evaluations, as ``megatron-staged report`` does), and the saving ``1 - FLOPs / FLOPs(scratch)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads spin-wait on a loaded machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_info, replace_section  # noqa: E402

from megatron_staged.tools.report import Run, compute_to_reach, read_run  # noqa: E402

DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
HEADING = "Zero/one-layer progressive training (Bu 2025)"
VARIANTS = {  # name -> (initial layers, depth_init, fresh_moments); None: no expansion / the default
    "scratch": (None, None, None),
    "0->L": (0, "random", None),
    "1->L": (1, "copy-stack", None),
    "0->L bc": (0, "random", "bias-corrected"),
    "0->L zero": (0, "zero", None),
    "1->L random": (1, "random", None),
    "1->L zero": (1, "zero", None),
}


def variant(name: str, default_fraction: float) -> tuple:
    """(initial layers, depth_init, fresh_moments, expansion fraction) of a variant name such as
    ``1->L@0.5`` (expanded at 0.5 T)."""
    base, _, at = name.partition("@")
    return VARIANTS[base] + (float(at) if at else default_fraction,)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=6, help="target depth L")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--at-fraction", type=float, default=0.8, help="expansion point (fraction of the run)")
    p.add_argument("--eval-interval", type=int, default=30)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--seeds", default="1234,1235,1236")
    p.add_argument("--fresh-moments", default=None, choices=("zero", "bias-corrected"),
                   help="the expansion stage's fresh_moments (default: the stage default)")
    p.add_argument("--variants", default="scratch,0->L,1->L,0->L bc",
                   help=f"comma-separated, from {', '.join(VARIANTS)}; '@F' expands at F T instead of --at-fraction")
    p.add_argument("--quick", action="store_true", help="a small model, one seed (< 10 min)")
    p.add_argument("--out-json", default=None, help="results, rewritten after every run")
    p.add_argument("--from-json", default=None, help="render (--write-docs) the complete seeds of an earlier --out-json")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs-heading", default=HEADING, help="the docs/benchmarks.md section to (re)write")
    a = p.parse_args(argv)
    if a.quick:
        a.num_layers, a.hidden_size, a.seq_length, a.train_iters = 4, 64, 64, 200
        a.eval_interval, a.eval_iters, a.seeds = 20, 4, a.seeds.split(",")[0]
    return a


def run_variant(a, name: str, seed: int, workdir: str) -> dict:
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    start_layers, init, fresh, fraction = variant(name, a.at_fraction)
    T = a.train_iters
    log = os.path.join(workdir, f"{name.replace('->', '_to_').replace(' ', '_')}_{seed}.jsonl")
    args = ["--builtin-corpus", "--num-layers", str(a.num_layers if start_layers is None else start_layers),
            "--hidden-size", str(a.hidden_size), "--num-attention-heads", str(a.num_attention_heads),
            "--seq-length", str(a.seq_length), "--max-position-embeddings", str(a.seq_length),
            "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
            "--lr", str(a.lr), "--min-lr", "0", "--lr-decay-style", "WSD", "--lr-warmup-iters", str(max(1, T // 50)),
            "--lr-wsd-decay-iters", str(max(1, T // 10)), "--lr-wsd-decay-style", "linear",
            "--train-iters", str(T), "--eval-interval", str(a.eval_interval), "--eval-iters", str(a.eval_iters),
            "--log-interval", "1000000", "--progress-bar", "off", "--seed", str(seed), "--log-file", log]
    cfg = config_from_args(_train_parser("bench").parse_args(args))
    if start_layers is not None:
        cfg.staging.stages = [{"at_fraction": fraction, "num_layers": a.num_layers, "depth_init": init}]
        if fresh or a.fresh_moments:
            cfg.staging.stages[0]["fresh_moments"] = fresh or a.fresh_moments
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.train()
    wall = time.perf_counter() - t0
    run = read_run(log)
    evals = [(it, flops, loss) for it, flops, _, loss in run.evals]
    growth = run.growths[0] if run.growths else None
    out = {"variant": name, "seed": seed, "wall_s": wall, "flops": summary["flops_so_far"],
           "final_val_loss": evals[-1][2], "evals": evals,
           "expansion": None if growth is None else {k: growth[k] for k in ("iteration", "eval_loss_before",
                                                                            "eval_loss_after")}}
    print(f"{name} seed {seed}: val loss {out['final_val_loss']:.4f}, {out['flops']:.3e} FLOPs, {wall:.0f}s",
          file=sys.stderr, flush=True)
    del trainer
    return out


def flops_to_reach(evals: list, target: float):
    """FLOPs at which the validation curve first reaches ``target`` (``report``'s rule), None if never."""
    reach = compute_to_reach(Run("run", evals=[(it, flops, 0.0, loss) for it, flops, loss in evals]), target)
    return reach if math.isfinite(reach) else None


def summarise(runs: list) -> dict:
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["variant"]] = r
    rows = {}
    for seed, vs in by_seed.items():
        base = vs["scratch"]
        for name, r in vs.items():
            reach = flops_to_reach(r["evals"], base["final_val_loss"])
            rows.setdefault(name, []).append({
                "seed": seed, "final_val_loss": r["final_val_loss"],
                "gap": r["final_val_loss"] / base["final_val_loss"] - 1.0,
                "flops": r["flops"], "flops_ratio": r["flops"] / base["flops"],
                "reach_flops": reach, "saving_to_reach": None if reach is None else 1.0 - reach / base["flops"],
                "wall_s": r["wall_s"],
                # FLOPs of one iteration of the small model, as a share of one of the L-layer model
                "small_cost": None if r["expansion"] is None or r["evals"][0][0] >= r["expansion"]["iteration"]
                else r["evals"][0][1] / base["evals"][0][1],
                "jump": None if r["expansion"] is None else
                r["expansion"]["eval_loss_after"] - r["expansion"]["eval_loss_before"]})
    return rows


def main(argv=None):
    a = parse_args(argv)
    if a.from_json:  # render what an earlier (possibly interrupted) run wrote
        res = json.load(open(a.from_json))
        complete = {r["seed"] for r in res["runs"] if r["variant"] == "scratch"}
        res["runs"] = [r for r in res["runs"] if r["seed"] in complete]
    else:
        res = {"args": vars(a), "machine": machine_info(1), "load_before": os.getloadavg(), "runs": []}
        with tempfile.TemporaryDirectory() as workdir:
            for seed in (int(s) for s in a.seeds.split(",")):
                for name in a.variants.split(","):
                    res["runs"].append(run_variant(a, name, seed, workdir))
                    res["load_after"] = os.getloadavg()
                    if a.out_json:  # after every run: an interrupted benchmark keeps what it measured
                        with open(a.out_json, "w") as fh:
                            json.dump(res, fh, indent=1)
    res["args"]["seeds"] = ",".join(str(s) for s in dict.fromkeys(r["seed"] for r in res["runs"]))
    res["summary"] = summarise(res["runs"])
    print(json.dumps(res["summary"], indent=1))
    if a.out_json:
        with open(a.out_json, "w") as fh:
            json.dump(res, fh, indent=1)
    if a.write_docs:
        replace_section(DOCS, a.docs_heading, render(res))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _pct(x):
    return "not reached" if x is None else f"{100 * x:.1f}%"


def render(res) -> str:
    a, m, s = res["args"], res["machine"], res["summary"]
    lines = []
    for name, rows in s.items():
        reached = [r for r in rows if r["reach_flops"] is not None]
        per_seed = ", ".join(f"{100 * r['gap']:+.2f}" for r in rows)
        jump = "-" if rows[0]["jump"] is None else f"{_mean([r['jump'] for r in rows]):+.4f}"
        cost = "-" if rows[0]["small_cost"] is None else f"{100 * rows[0]['small_cost']:.1f}%"
        lines.append(
            f"| {name} | {len(rows)} | {_mean([r['final_val_loss'] for r in rows]):.4f} | "
            f"{100 * _mean([r['gap'] for r in rows]):+.2f}% ({per_seed}) | "
            f"{_mean([r['flops'] for r in rows]):.3e} | {100 * (1 - _mean([r['flops_ratio'] for r in rows])):.1f}% | "
            f"{len(reached)}/{len(rows)} | {_pct(_mean([r['saving_to_reach'] for r in reached]) if reached else None)} | "
            f"{jump} | {cost} |")
    quick = " --quick" if a["quick"] else ""
    for flag, default in (("variants", "scratch,0->L,1->L,0->L bc"), ("train_iters", 300), ("seeds", "1234,1235,1236"),
                          ("docs_heading", HEADING)):
        if a.get(flag, default) != default:
            quick += f' --{flag.replace("_", "-")} "{a[flag]}"'
    load = ", ".join(f"{x:.1f}" for x in res["load_before"]) + " before, " + \
        ", ".join(f"{x:.1f}" for x in res["load_after"]) + " after"
    T = a["train_iters"]
    return f"""Command (one process, TP1 PP1, the built-in corpus via `--builtin-corpus`):

```
OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore python benchmarks/zero_one_layer.py{quick} --write-docs
```

Model: gpt2 family, target {a['num_layers']} layers, hidden {a['hidden_size']}, {a['num_attention_heads']} heads,
sequence {a['seq_length']}, global batch {a['global_batch_size']}, fp32, AdamW, LR {a['lr']:g}. Schedule for every run:
WSD over {T} iterations ({max(1, T // 50)} warmup, stable, the last {max(1, T // 10)} decaying linearly to 0); the
expansions run at iteration {round(a['at_fraction'] * T)} ({a['at_fraction']:g} T; a run named `@F` at F T), LR unchanged (rho 1, no
re-warmup); `0->L` uses `depth_init: random`, `1->L` `copy-stack`, `bc` adds `fresh_moments: bias-corrected`.
Same tokens for every run ({T * a['global_batch_size'] * a['seq_length']:,}); validation loss every {a['eval_interval']}
iterations on the same {a['eval_iters']} batches. Seeds: {a['seeds']}. Machine: {m['cpu_model']}, {m['cpu_cores_usable']}
usable cores shared with other jobs (load average {load}), torch {m['torch']}, megatron-core {m['megatron_core']},
{m['date']}.

| run | seeds | final val loss (mean) | gap to scratch (mean; per seed, %) | model FLOPs (run) | FLOPs saving (run) | reached scratch's final loss | FLOPs saving to reach it (mean of those that did) | val loss jump at expansion | small model's iteration FLOPs / L-layer's |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

"FLOPs saving (run)" is 1 - FLOPs(run) / FLOPs(scratch) at the same token budget; "to reach" uses the
FLOPs at which the run's validation curve first reaches scratch's final validation loss (interpolated
in (log FLOPs, loss) between evaluations, as `megatron-staged report` does), per seed against that seed's scratch run.
"""


if __name__ == "__main__":
    main()
