"""``megatron-staged report RUN.jsonl... [--baseline RUN.jsonl] [--out report.png]``.

Reads runs' metric logs (``train --log-file``) and prints, per run: the final validation loss, the
FLOPs and wall time of each stage (between growths), and with ``--baseline`` the compute each run
needed to reach the baseline's final validation loss and the saving against the baseline's compute
at that validation point (``1 - C_run / C_baseline``; FLOPs the baseline logged after its last
validation point do not count, since they bought no measured loss). Writes a PNG of validation
loss against FLOPs and against wall time with the growth points marked.

Compute to reach a loss: the first validation point at or below it, interpolated linearly in
(log C, loss) between that point and the one before. Wall time: the sum of the iterations' times
plus the growths' seconds (what the log records), so it excludes start-up and evaluation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

from megatron_staged.errors import UserError
from megatron_staged.training.logger import json_safe


@dataclass
class Run:
    name: str
    evals: list = field(default_factory=list)        # (iteration, flops so far, wall seconds, eval loss)
    growths: list = field(default_factory=list)      # growth events as logged
    subnet_stages: list = field(default_factory=list)  # RaPTr stage transitions as logged
    stages: list = field(default_factory=list)       # per stage: dict(layers, hidden, iterations, flops, seconds)
    final_flops: float = 0.0
    final_seconds: float = 0.0

    @property
    def final_eval(self) -> float:
        return self.evals[-1][3] if self.evals else math.nan


def _nan_for_null(record: dict) -> dict:
    """The logger writes a non-finite loss as null (strict JSON); read it back as NaN. Logs of
    earlier versions hold bare ``NaN``, which ``json.loads`` reads as NaN already."""
    for k, v in record.items():
        if v is None and (k == "grad_norm" or k.endswith("loss") or "loss_" in k):
            record[k] = math.nan
    return record


def metric_records(path: str):
    """The records of a JSONL metrics log (``train --log-file``), one dict per line.

    A record cut short (a run killed mid-write leaves a partial last line; a run resumed into the
    same file used to append its first record to that partial line) is skipped with a warning on
    stderr; a line that is not a JSON record at all is refused."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (give the JSONL written by `train --log-file`)")
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                if line.lstrip().startswith("{"):
                    print(f"warning: {path}:{n}: skipped a record cut short (a run stopped while writing it)",
                          file=sys.stderr)
                    continue
                raise UserError(f"{path}:{n}: not a JSON line; is this a `train --log-file` metrics log?")
            yield _nan_for_null(record)


def read_run(path: str) -> Run:
    """A run from its JSONL metrics log (iteration records, eval records, events)."""
    run = Run(name=os.path.splitext(os.path.basename(path))[0])
    seconds, flops, last_it = 0.0, 0.0, 0
    stage, pending_trigger = None, None
    for r in metric_records(path):
        if "loss" in r and "flops_so_far" in r and "event" not in r:  # an iteration (a trigger event has a loss too)
            if r["iteration"] == 1 and last_it >= 1:  # a new run from scratch appended to the same file
                print(f"warning: {path}: a run from scratch starts again after iteration {last_it}; reporting "
                      f"the last run in the file", file=sys.stderr)
                run = Run(name=run.name)
                seconds, flops, last_it, stage, pending_trigger = 0.0, 0.0, 0, None, None
            if r["iteration"] <= last_it:  # a resumed run repeats iterations after its checkpoint
                continue
            last_it = r["iteration"]
            seconds += r.get("elapsed_ms", 0.0) / 1e3
            flops = r["flops_so_far"]
            shape = (r.get("num_layers"), r.get("hidden_size"))
            if stage is None or (stage["layers"], stage["hidden"]) != shape:
                stage = {"layers": shape[0], "hidden": shape[1], "iterations": 0, "flops": 0.0, "seconds": 0.0}
                run.stages.append(stage)
            stage["iterations"] += 1
            stage["seconds"] += r.get("elapsed_ms", 0.0) / 1e3
            stage["flops_end"] = flops
        elif "eval_loss" in r:
            run.evals.append((r["iteration"], r.get("flops_so_far", flops), seconds, r["eval_loss"]))
        elif r.get("event") == "trigger":
            pending_trigger = r
        elif r.get("event") == "growth":
            seconds += r.get("growth_seconds", 0.0)
            g = dict(r, flops_so_far=flops, wall_seconds=seconds)
            if pending_trigger is not None and pending_trigger.get("iteration") == r.get("iteration"):
                g["trigger"] = pending_trigger  # the slope trigger that caused this growth
            pending_trigger = None
            run.growths.append(g)
        elif r.get("event") == "raptr_stage":
            run.subnet_stages.append(dict(r, flops_so_far=flops, wall_seconds=seconds))
    prev = 0.0
    for st in run.stages:
        st["flops"] = st.pop("flops_end", prev) - prev
        prev += st["flops"]
    run.final_flops, run.final_seconds = flops, seconds
    if not run.evals:
        raise UserError(f"{path} holds no validation losses; train with --eval-interval N (and --log-file)")
    return run


def compute_to_reach(run: Run, target: float) -> float:
    """FLOPs at which the run's validation loss first reaches ``target`` (NaN if it never does)."""
    prev = None
    for _, c, _, loss in run.evals:
        if loss <= target:
            if prev is None or prev[0] <= 0 or c <= 0:
                return c
            (c0, l0) = prev
            if l0 == loss:
                return c
            frac = (l0 - target) / (l0 - loss)
            return 10 ** (math.log10(c0) + frac * (math.log10(c) - math.log10(c0)))
        prev = (c, loss)
    return math.nan


def baseline_compute(baseline: Run) -> float:
    """FLOPs the baseline spent to measure its final validation loss (at its last validation point)."""
    return baseline.evals[-1][1]


def summarize(runs: list, baseline: Run | None) -> list:
    rows = []
    for run in runs:
        row = {"run": run.name, "final_eval_loss": run.final_eval, "flops": run.final_flops,
               "seconds": run.final_seconds, "stages": run.stages, "growths": len(run.growths),
               "growth_events": [{k: g.get(k) for k in ("iteration", "flops_so_far", "num_layers", "hidden_size",
                                                        "trigger")} for g in run.growths],
               "subnet_stages": run.subnet_stages}
        if baseline is not None:
            target = baseline.final_eval
            c = compute_to_reach(run, target)
            # the baseline's compute at its final validation point: the loss is measured there, and a
            # baseline may train on past it (--train-iters not a multiple of --eval-interval, a stop at
            # OPTIMALITY between evaluations) without that compute buying it a lower measured loss
            base_c = baseline_compute(baseline)
            row.update(target_loss=target, flops_to_target=c, baseline_flops_to_target=base_c,
                       saving=(1.0 - c / base_c) if math.isfinite(c) and base_c > 0 else math.nan,
                       final_loss_gap=run.final_eval - target)
        rows.append(row)
    return rows


def plot(runs: list, baseline: Run | None, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the picture needs matplotlib: pip install matplotlib (or megatron_staged[report])")
    fig, (ax_c, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    everything = ([baseline] if baseline else []) + list(runs)
    for run in everything:
        style = "--" if run is baseline else "-"
        label = f"{run.name} (baseline)" if run is baseline else run.name
        xs = [c for _, c, _, _ in run.evals]
        ts = [t for _, _, t, _ in run.evals]
        ys = [l for _, _, _, l in run.evals]
        line, = ax_c.plot(xs, ys, style, marker=".", label=label)
        ax_t.plot(ts, ys, style, marker=".", color=line.get_color(), label=label)
        for g in run.growths:
            ax_c.axvline(g["flops_so_far"], color=line.get_color(), alpha=0.4, linestyle=":")
            ax_t.axvline(g["wall_seconds"], color=line.get_color(), alpha=0.4, linestyle=":")
            ax_c.annotate(f"{g.get('num_layers')}x{g.get('hidden_size')}", (g["flops_so_far"], max(ys)),
                          fontsize=7, rotation=90, va="top", color=line.get_color())
        for t in run.subnet_stages[1:]:  # the first record is where the schedule starts
            ax_c.axvline(t["flops_so_far"], color=line.get_color(), alpha=0.3, linestyle="-.")
            ax_t.axvline(t["wall_seconds"], color=line.get_color(), alpha=0.3, linestyle="-.")
    if baseline is not None:
        for ax in (ax_c, ax_t):
            ax.axhline(baseline.final_eval, color="grey", linewidth=0.8)
    ax_c.set_xscale("log")
    ax_c.set_xlabel("training FLOPs")
    ax_t.set_xlabel("wall time (s, iterations + growths)")
    for ax in (ax_c, ax_t):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=8)
    ax_c.set_title("validation loss vs compute (dotted: growths, dash-dot: RaPTr stages)")
    ax_t.set_title("validation loss vs wall time")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def format_rows(rows: list) -> str:
    lines = []
    for r in rows:
        head = f"{r['run']}: final validation loss {r['final_eval_loss']:.4f}, {r['flops']:.3e} FLOPs, {r['seconds']:.1f}s"
        if "target_loss" in r:
            if math.isfinite(r["flops_to_target"]):
                head += (f" | reaches the baseline's {r['target_loss']:.4f} at {r['flops_to_target']:.3e} FLOPs: "
                         f"saving {100 * r['saving']:+.1f}%")
            else:
                head += f" | never reaches the baseline's {r['target_loss']:.4f}"
            head += f" | final gap {r['final_loss_gap']:+.4f}"
        lines.append(head)
        for i, st in enumerate(r["stages"]):
            lines.append(f"    stage {i}: {st['layers']} layers x {st['hidden']}: {st['iterations']} iterations, "
                         f"{st['flops']:.3e} FLOPs, {st['seconds']:.1f}s")
        for g in r.get("growth_events", []):
            why = ""
            t = g.get("trigger")
            if t is not None:
                why = (f" ({t.get('kind', 'PRE-GROWTH')} slope trigger: slope {t['slope']:.4f} > "
                       f"{t['threshold']:.4f}, loss {t['loss']:.4f})")
            lines.append(f"    growth at iteration {g['iteration']} ({g['flops_so_far']:.3e} FLOPs) -> "
                         f"{g.get('num_layers')} layers x {g.get('hidden_size')}{why}")
        for t in r["subnet_stages"]:
            what = ("all layers" if t.get("until") is None else
                    f"RaPTr stage {t['stage'] + 1}/{t['of']}: {t['expected_active_layers']:.2f}/{t['num_layers']} "
                    f"layers expected active")
            lines.append(f"    from iteration {t['iteration']} ({t['flops_so_far']:.3e} FLOPs): {what}")
    return "\n".join(lines)


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="megatron-staged report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="metric logs (JSONL from train --log-file)")
    p.add_argument("--baseline", default=None, help="the run to compare against (e.g. the target trained from scratch)")
    p.add_argument("--out", default="report.png", help="where to write the PNG")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    runs = [read_run(r) for r in a.runs]
    baseline = read_run(a.baseline) if a.baseline else None
    rows = summarize(runs, baseline)
    plot(runs, baseline, a.out)
    if a.json:  # stdout is one JSON document (NaN, e.g. a run that never reaches the target, as null)
        print(json.dumps(json_safe(rows), indent=1, allow_nan=False))
        print(f"wrote {a.out}", file=sys.stderr)
    else:
        print(format_rows(rows))
        print(f"wrote {a.out}")
    return 0
