#!/usr/bin/env python
"""Compute saving of staged training on the built-in corpus: FLOPs to the same validation loss.

    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore python benchmarks/compute_saving.py --write-docs
    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore python benchmarks/compute_saving.py --quick

A small target model trained from scratch (``scratch``) against the same target reached by growth
(2xD with identity and with copy init of the new layers, 2xW, 2xDxW, 2x2xD), each scheduled by
the slope triggers (``trigger: slope``, the paper's thresholds) and by the Kaplan planner
(``plan --mode kaplan``'s growth iterations). Every run is a subprocess of
``python -m megatron_staged train`` with a YAML config (model, schedule, ``staging.stages``) and
``--log-file``; the figures come from those metric logs through ``tools/report.py``'s reader.

Same token budget (``--train-iters`` x global batch x sequence), same LR rules (warm-up, cosine
decay to ``min_lr`` over the run; at a growth the project's LR-at-growth-target rule with its
default rho and ``rewarmup_iters``), same data order (``--seed``), same validation set: the
last 5% of the (shuffled) corpus documents, evaluated from its start every ``--eval-interval``.

Per run: FLOPs to reach the baseline's final validation loss (log-linear interpolation between
validation points, ``report``'s rule), the saving ``1 - C_run / C_baseline``, the final-loss gap,
and the saving at the run's own final loss (``1 - C_run_total / C_baseline_to_that_loss``, the
planner's definition, defined also when the run ends above the baseline). Wall time is the
subprocess's, and depends on the machine's load; FLOPs do not.

The scenario list is a registry (``SCENARIOS``; ``register``): a scenario is a name, a growth
recipe (the paper's shorthand), a schedule (``slope`` | ``planner`` | ``fixed``) and stage options.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
PNG = os.path.join(ROOT, "docs", "compute_saving.png")
HEADING = "Compute saving: staged vs from scratch to the same validation loss"


# ---- scenarios ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """``recipe``: growths ending at the target (planning/kaplan.py's shorthand; None = from scratch).
    ``schedule``: ``slope`` (trigger: slope at the paper's thresholds), ``planner`` (Kaplan plan's
    growth iterations) or ``fixed`` (``at`` = fractions of the run). ``stage``: extra stage keys."""
    name: str
    recipe: Optional[str] = None
    schedule: str = "scratch"
    stage: dict = field(default_factory=dict)
    at: tuple = ()
    quick: bool = False        # part of --quick


SCENARIOS: dict[str, Scenario] = {}


def register(sc: Scenario) -> Scenario:
    SCENARIOS[sc.name] = sc
    return sc


register(Scenario("scratch", quick=True))
for _sched in ("slope", "planner"):
    register(Scenario(f"2xD-identity/{_sched}", "2xD", _sched, {"depth_init": "identity"}, quick=True))
    register(Scenario(f"2xD-copy/{_sched}", "2xD", _sched, {"depth_init": "copy"}))
    register(Scenario(f"2xW/{_sched}", "2xW", _sched))
    register(Scenario(f"2xDxW/{_sched}", "2xDxW", _sched, {"depth_init": "identity"}))
    register(Scenario(f"2x2xD/{_sched}", "2x2xD", _sched, {"depth_init": "identity"}))
# a hand-picked reference (not an automatic schedule): the quickstart's kind of growth at 30% of the run
register(Scenario("2xD-identity/at-30%", "2xD", "fixed", {"depth_init": "identity"}, at=(0.3,)))


# ---- runs --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few scenarios, one seed, a short budget (~10 min)")
    p.add_argument("--num-layers", type=int, default=4, help="target depth")
    p.add_argument("--hidden-size", type=int, default=64, help="target width")
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=None, help="budget (default 1000; --quick 150)")
    p.add_argument("--eval-interval", type=int, default=None, help="default train_iters / 12")
    p.add_argument("--eval-iters", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rewarmup-iters", type=int, default=None, help="at a growth (default train_iters / 30)")
    p.add_argument("--vocab-size", type=int, default=2048, help="built-in corpus tokenizer")
    p.add_argument("--corpus-bytes", type=int, default=13_000_000, help="all of the stdlib's source")
    p.add_argument("--corpus-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron_staged",
                                                       "bench_corpus"))
    p.add_argument("--seeds", type=int, default=3, help="seeds for the decisive comparisons")
    p.add_argument("--decisive", type=int, default=2, help="automatic schedules repeated over --seeds")
    p.add_argument("--scenarios", default=None, help="comma-separated names (default: all, or the quick set)")
    p.add_argument("--runs", default=None, help="only run these NAME@SEED (comma-separated) and stop, e.g. to "
                                                 "spread a benchmark over processes; a later run reads them")
    p.add_argument("--decisive-names", default=None, help="the scenarios repeated over --seeds (default: the best "
                                                          "slope-triggered and the best planned one of seed 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one process each)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "benchmarks", "_compute_saving"))
    p.add_argument("--out-json", default=None)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--analyze-only", action="store_true", help="only re-read the logs of finished runs in --work-dir (start none)")
    a = p.parse_args(argv)
    if a.train_iters is None:
        a.train_iters = 150 if a.quick else 1000
    if a.eval_interval is None:
        a.eval_interval = max(1, a.train_iters // 12)
    if a.rewarmup_iters is None:
        a.rewarmup_iters = max(1, a.train_iters // 30)
    if a.quick:
        a.seeds = 1
    return a


def corpus(a) -> dict:
    from megatron_staged.data import prepare_default_corpus

    return prepare_default_corpus(a.corpus_dir, vocab_size=a.vocab_size, max_bytes=a.corpus_bytes)


def initial_shape(a, growths) -> tuple[int, int, int]:
    L, d, h = a.num_layers, a.hidden_size, a.num_attention_heads
    for g in growths:
        L //= g.get("depth_factor", 1)
        d //= g.get("width_factor", 1)
        h //= g.get("width_factor", 1)
    return L, d, h


def stages_for(a, sc: Scenario) -> list[dict]:
    from megatron_staged.planning.kaplan import parse_growths, plan_kaplan

    if sc.recipe is None:
        return []
    growths = parse_growths(sc.recipe)
    stages = []
    for g in growths:
        st = dict(g, rewarmup_iters=a.rewarmup_iters, eval_iters=2)
        if "depth_factor" in g:
            st.update({k: v for k, v in sc.stage.items() if k.startswith("depth")})
        st.update({k: v for k, v in sc.stage.items() if not k.startswith("depth")})
        stages.append(st)
    if sc.schedule == "slope":
        for st in stages:
            st["trigger"] = "slope"
    elif sc.schedule == "planner":
        plan = plan_kaplan(a.num_layers, a.hidden_size, growths, a.train_iters, a.global_batch_size * a.seq_length)
        for st, ps in zip(stages, plan.stages[1:]):
            st["at_iteration"] = max(1, min(ps.start_iteration, a.train_iters - 1))
    else:
        for st, frac in zip(stages, sc.at):
            st["at_iteration"] = int(frac * a.train_iters)
    return stages


def run_one(a, info, sc: Scenario, seed: int) -> dict:
    import yaml

    growths = []
    if sc.recipe:
        from megatron_staged.planning.kaplan import parse_growths

        growths = parse_growths(sc.recipe)
    L, d, h = initial_shape(a, growths)
    tag = f"{sc.name.replace('/', '_')}_s{seed}"
    os.makedirs(a.work_dir, exist_ok=True)
    log = os.path.join(a.work_dir, tag + ".jsonl")
    meta_path = os.path.join(a.work_dir, tag + ".meta.json")
    if os.path.exists(meta_path) and os.path.exists(log):
        return json.load(open(meta_path))
    if a.analyze_only:
        raise SystemExit(f"--analyze-only: {sc.name} seed {seed} has no finished run in {a.work_dir}")
    if os.path.exists(log):
        os.remove(log)
    stages = stages_for(a, sc)
    cfg_path = os.path.join(a.work_dir, tag + ".yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump({"staging": {"stages": stages}} if stages else {}, f, sort_keys=False)
    cmd = [sys.executable, "-m", "megatron_staged", "train", "--config", cfg_path,
           "--num-layers", str(L), "--hidden-size", str(d), "--num-attention-heads", str(h),
           "--seq-length", str(a.seq_length), "--max-position-embeddings", str(a.seq_length),
           "--micro-batch-size", str(a.global_batch_size), "--global-batch-size", str(a.global_batch_size),
           "--train-iters", str(a.train_iters), "--lr", str(a.lr), "--min-lr", str(a.lr / 10),
           "--lr-warmup-iters", str(max(1, a.train_iters // 30)), "--lr-decay-style", "cosine",
           "--weight-decay", "0.01", "--clip-grad", "1.0",
           "--eval-interval", str(a.eval_interval), "--eval-iters", str(a.eval_iters),
           "--log-interval", str(10 ** 9), "--seed", str(seed),
           "--data-path", info["data_prefix"], "--split", "95,5,0", "--tokenizer-type", "SentencePieceTokenizer",
           "--tokenizer-model", info["tokenizer_model"], "--log-file", log]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=a.work_dir)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{sc.name} seed {seed} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    meta = {"scenario": sc.name, "seed": seed, "log": log, "wall_seconds": wall, "stages": stages,
            "initial": [L, d, h], "command": " ".join(cmd[1:])}
    json.dump(meta, open(meta_path, "w"), indent=1)
    print(f"  {sc.name} seed {seed}: {wall:.0f}s", flush=True)
    return meta


# ---- analysis ----------------------------------------------------------------------------------

def figures(meta: dict, baseline_meta: dict) -> dict:
    from megatron_staged.tools.report import compute_to_reach, metric_records, read_run

    run, base = read_run(meta["log"]), read_run(baseline_meta["log"])
    target = base.final_eval
    c = compute_to_reach(run, target)
    c_base_at_own = compute_to_reach(base, run.final_eval)
    # compute at the last validation point (the final loss is measured there, not at the last iteration)
    base_total, run_total = base.evals[-1][1], run.evals[-1][1]
    triggers = [r for r in metric_records(meta["log"]) if r.get("event") == "trigger"]
    se = [r["eval_loss_se"] for r in metric_records(meta["log"]) if "eval_loss_se" in r]
    # the highest training-curve slope of the first stage (the trigger's estimate, default window), to
    # say how far a slope trigger that did not fire was from its threshold
    from megatron_staged.staging.triggers import windowed_slopes

    first_growth = run.growths[0]["iteration"] if run.growths else math.inf
    curve = [(r["flops_so_far"], r["loss"]) for r in metric_records(meta["log"])
             if "elapsed_ms" in r and "event" not in r and r["iteration"] <= first_growth]
    _, slopes = windowed_slopes(curve, 2.0, 10) if len(curve) > 10 else (None, [])
    finite = [x for x in slopes if math.isfinite(x)]
    return {"scenario": meta["scenario"], "seed": meta["seed"], "final_loss": run.final_eval,
            "baseline_final_loss": target, "flops": run.final_flops, "baseline_flops": base.final_flops,
            "flops_to_baseline_loss": c,
            "saving": 1.0 - c / base_total if math.isfinite(c) else math.nan,
            "saving_at_own_loss": (1.0 - run_total / c_base_at_own) if math.isfinite(c_base_at_own) else math.nan,
            "final_gap": run.final_eval - target, "wall_seconds": meta["wall_seconds"],
            "train_seconds": run.final_seconds,
            "growths": [(g["iteration"], g.get("num_layers"), g.get("hidden_size")) for g in run.growths],
            "triggers": [(t["iteration"], t.get("slope")) for t in triggers],
            "valid_se": se[-1] if se else math.nan,
            "max_slope_first_stage": max(finite) if finite else math.nan,
            "slope_after_minimum_max": (max(finite[finite.index(min(finite)):]) if finite else math.nan)}


def mean_ci(xs: list) -> tuple:
    """Mean and the half-width of a 95% t interval (NaN for fewer than 2 values)."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan, 0
    if len(xs) < 2:
        return xs[0], math.nan, 1
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}.get(len(xs), 2.45)
    return statistics.mean(xs), t * statistics.stdev(xs) / math.sqrt(len(xs)), len(xs)


def pct(x) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def main(argv=None) -> int:
    from common import machine_info, replace_section

    a = parse_args(argv)
    names = (a.scenarios.split(",") if a.scenarios else
             [n for n, s in SCENARIOS.items() if s.quick or not a.quick])
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; known: {sorted(SCENARIOS)}")
    if "scratch" not in names:
        names.insert(0, "scratch")
    load_before = os.getloadavg()
    t_start = time.time()
    info = corpus(a)
    tokens_needed = a.train_iters * a.global_batch_size * (a.seq_length + 1)
    print(f"corpus: {info['num_documents']} documents, {info['num_tokens']} tokens (95% train); budget "
          f"{tokens_needed} tokens = {tokens_needed / (0.95 * info['num_tokens']):.2f} epochs", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    def run_all(keys):
        with ThreadPoolExecutor(a.jobs) as ex:
            for k, m in zip(keys, ex.map(lambda k: run_one(a, info, SCENARIOS[k[0]], k[1]), keys)):
                metas[k] = m

    metas = {}
    if a.runs:
        run_all([(x.rsplit("@", 1)[0], int(x.rsplit("@", 1)[1])) for x in a.runs.split(",")])
        return 0
    # phase 1: every scenario, seed 1
    run_all([(n, 1) for n in names])
    rows1 = {n: figures(metas[(n, 1)], metas[("scratch", 1)]) for n in names}
    auto = [n for n in names if SCENARIOS[n].schedule in ("slope", "planner")]

    def key(n):
        r = rows1[n]
        return r["saving"] if math.isfinite(r["saving"]) else (r["saving_at_own_loss"] - 1.0
                                                               if math.isfinite(r["saving_at_own_loss"]) else -9)
    # the best automatic schedule of each kind (slope triggers, planner), then the next best overall
    ranked = sorted(auto, key=key, reverse=True)
    decisive = [next(n for n in ranked if SCENARIOS[n].schedule == kind) for kind in ("slope", "planner")
                if any(SCENARIOS[n].schedule == kind for n in ranked)]
    decisive += [n for n in ranked if n not in decisive][:max(0, a.decisive - len(decisive))]
    if a.decisive_names:
        decisive = a.decisive_names.split(",")
    # phase 2: the best automatic schedules and the baseline over more seeds
    run_all([(n, seed) for seed in range(2, a.seeds + 1) for n in ["scratch"] + decisive])
    rows = [figures(m, metas[("scratch", s)]) for (n, s), m in sorted(metas.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    # the best fixed-size model of seed 1 (the target from scratch, or a slope-scheduled run whose trigger never
    # fired: its initial model trained for the whole budget): does growth beat simply training a smaller model?
    fixed = [r for r in rows if r["seed"] == 1 and not r["growths"]]
    best_fixed = min(fixed, key=lambda r: r["final_loss"])
    control = {"scenario": best_fixed["scenario"], "final_loss": best_fixed["final_loss"], "rows": []}
    from megatron_staged.tools.report import compute_to_reach, read_run

    ctrl_run = read_run(metas[(best_fixed["scenario"], 1)]["log"])
    for r in rows:
        if r["seed"] == 1 and r["growths"]:
            c = compute_to_reach(read_run(metas[(r["scenario"], 1)]["log"]), ctrl_run.final_eval)
            control["rows"].append((r["scenario"], 1.0 - c / ctrl_run.evals[-1][1] if math.isfinite(c) else math.nan,
                                    r["final_loss"] - ctrl_run.final_eval))
    load_after = os.getloadavg()
    result = {"args": vars(a), "corpus": {k: info[k] for k in ("num_documents", "num_tokens")},
              "epochs": tokens_needed / (0.95 * info["num_tokens"]), "rows": rows, "decisive": decisive,
              "control": control, "machine": machine_info(1), "load_before": load_before, "load_after": load_after,
              "elapsed_seconds": time.time() - t_start}
    text = render(a, result, names)
    print(text)
    if a.out_json:
        json.dump(result, open(a.out_json, "w"), indent=1)
    if a.write_docs:
        from megatron_staged.tools.report import read_run, plot

        runs = []
        for n in names:
            r = read_run(metas[(n, 1)]["log"])
            r.name = n
            runs.append(r)
        base = runs.pop(0)
        png = PNG.replace(".png", "_quick.png") if a.quick else PNG
        plot(runs, base, png)
        replace_section(DOCS, HEADING + (" (--quick)" if a.quick else ""),
                        text + f"\n![loss vs FLOPs]({os.path.basename(png)})\n")
        json.dump(result, open(png.replace(".png", ".json"), "w"), indent=1)
    return 0


def render(a, result, names) -> str:
    rows = result["rows"]
    m = result["machine"]
    by = {}
    for r in rows:
        by.setdefault(r["scenario"], []).append(r)
    base_final = [r["final_loss"] for r in by["scratch"]]
    se = [r["valid_se"] for r in by["scratch"] if math.isfinite(r["valid_se"])]
    lines = [
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/compute_saving.py{' --quick' if a.quick else ''} --write-docs`"
        f" ({m['date']}; {m['cpu_model']}, {m['cpu_cores_usable']} usable cores; load average "
        f"{result['load_before'][0]:.0f} before, {result['load_after'][0]:.0f} after: the machine was shared, so wall "
        f"times are indicative only; FLOPs and losses do not depend on load). The runs' wall times add up to "
        f"{sum(r['wall_seconds'] for r in rows) / 60:.0f} min ({len(rows)} runs, {a.jobs} at a time).",
        "",
        f"Target: {a.num_layers} layers x hidden {a.hidden_size}, {a.num_attention_heads} heads, seq {a.seq_length}, "
        f"global batch {a.global_batch_size}, {a.train_iters} iterations "
        f"({a.train_iters * a.global_batch_size * a.seq_length / 1e6:.2f}M tokens, {result['epochs']:.2f} epochs of the "
        f"training split of the built-in corpus: {result['corpus']['num_documents']} shuffled stdlib modules, "
        f"{result['corpus']['num_tokens'] / 1e6:.2f}M tokens, vocab {a.vocab_size}); cosine LR {a.lr:g} -> {a.lr / 10:g}, "
        f"warm-up {max(1, a.train_iters // 30)}, re-warm-up {a.rewarmup_iters} at a growth; validation every "
        f"{a.eval_interval} iterations on {a.eval_iters} x {a.global_batch_size} sequences of the held-out 5% of documents.",
        "",
        "Seed 1, every scenario (saving: FLOPs to the baseline's final validation loss against the baseline's total; "
        "at own loss: the run's total FLOPs against the baseline's FLOPs to the run's final loss):",
        "",
        "| scenario | growths (iteration: layers x hidden) | final val loss | gap | FLOPs | saving | saving at own loss | wall s | first-stage slope after its minimum, max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = next(x for x in by[n] if x["seed"] == 1)
        g = ", ".join(f"{it}: {L}x{h}" for it, L, h in r["growths"]) or "-"
        lines.append(f"| {n} | {g} | {r['final_loss']:.4f} | {r['final_gap']:+.4f} | {r['flops']:.3g} | "
                     f"{pct(r['saving'])} | {pct(r['saving_at_own_loss'])} | {r['wall_seconds']:.0f} | "
                     f"{r['slope_after_minimum_max']:.3f} |")
    lines += ["", f"Noise: validation sampling standard error (over the eval batches) "
                  f"{statistics.mean(se) if se else math.nan:.4f}; baseline final loss over seeds "
                  f"{', '.join(f'{x:.4f}' for x in base_final)}"
                  + (f" (std {statistics.stdev(base_final):.4f})" if len(base_final) > 1 else "") + "."]
    ctl = result["control"]
    lines += ["", f"Against the best fixed-size run of seed 1, `{ctl['scenario']}` (final loss {ctl['final_loss']:.4f}; "
                  f"a slope-scheduled run whose trigger never fired trains its initial model for the whole budget): "
                  "saving to its final loss / final-loss difference:", ""]
    lines += [f"* {n}: {pct(sv)}, {gap:+.4f}" for n, sv, gap in ctl["rows"]]
    if a.seeds > 1:
        lines += ["", f"Decisive comparisons over {a.seeds} seeds (mean and 95% t interval; each seed against the "
                      f"baseline of the same seed):", "",
                  "| scenario | seeds | saving | saving at own loss | final-loss gap |", "|---|---|---|---|---|"]
        for n in ["scratch"] + result["decisive"]:
            rs = by[n]
            s, s_ci, k = mean_ci([r["saving"] for r in rs])
            o, o_ci, _ = mean_ci([r["saving_at_own_loss"] for r in rs])
            gp, gp_ci, _ = mean_ci([r["final_gap"] for r in rs])
            lines.append(f"| {n} | {len(rs)} ({k} reached) | {pct(s)} ± {100 * s_ci:.1f} | {pct(o)} ± {100 * o_ci:.1f} | "
                         f"{gp:+.4f} ± {gp_ci:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
