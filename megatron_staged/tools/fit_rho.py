"""``megatron-staged fit-rho --small SMALL.jsonl --large LARGE.jsonl [--at-iteration S]``.

rho (Shen et al. 2022) = S_pre / S_target: a model grown at step ``S_pre`` of the small run
continues on the large model's schedule at ``S_target``, the step where the large model trained
from scratch reaches the small model's loss at ``S_pre``. Given the two runs' metric logs (both
trained from scratch, same batch size), this reads both training-loss curves, smooths each with a
trailing mean over ``--smooth`` iterations, and finds for each ``S_pre`` the first large-run step
whose smoothed loss is at or below the small run's: ``rho = S_pre / S_target``.

Without ``--at-iteration`` it prints rho at 20, 40, 60 and 80% of the small run and their median
(the value to give as a stage's ``rho``).
"""
from __future__ import annotations

import argparse
import statistics

from megatron_staged.errors import UserError


def read_losses(path: str) -> list[tuple[int, float]]:
    """(iteration, training loss), each iteration once (a resumed run repeats some)."""
    return read_run_losses(path)[0]


def read_run_losses(path: str) -> tuple[list[tuple[int, float]], float | None]:
    """(iteration, training loss) pairs and the run's samples per iteration (None if not logged).
    Refuses a staged run: rho compares two models each trained from scratch."""
    from megatron_staged.tools.report import metric_records

    out, last, batch = [], 0, None
    for r in metric_records(path):
        if r.get("event") == "growth":
            raise UserError(f"{path} is a staged run (it grows at iteration {r.get('iteration')}); fit-rho needs "
                            f"two runs trained from scratch, one of the small model and one of the large")
        if "loss" in r and "iteration" in r and "event" not in r and r["iteration"] == 1 and last >= 1:
            out, last, batch = [], 0, None  # a run from scratch appended to the same file: read the last run
        if "loss" in r and "iteration" in r and "event" not in r and r["iteration"] > last:
            last = r["iteration"]
            out.append((int(r["iteration"]), float(r["loss"])))
            if batch is None and r.get("consumed_samples") and r["iteration"] > 0:
                batch = r["consumed_samples"] / r["iteration"]
    if len(out) < 2:
        raise UserError(f"{path} holds fewer than 2 training losses")
    return out, batch


def smooth(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing mean over ``window`` points."""
    out, acc = [], 0.0
    for i, (it, v) in enumerate(curve):
        acc += v
        if i >= window:
            acc -= curve[i - window][1]
        out.append((it, acc / min(i + 1, window)))
    return out


def rho_at(small: list, large: list, s_pre: int) -> tuple[float, int] | None:
    """(rho, S_target) for growth at small-run iteration ``s_pre``; None if the large run never
    gets down to that loss."""
    loss = next((v for it, v in small if it >= s_pre), None)
    if loss is None:
        raise UserError(f"--at-iteration {s_pre} lies beyond the small run's last iteration {small[-1][0]}")
    s_target = next((it for it, v in large if v <= loss), None)
    if s_target is None:
        return None
    return s_pre / s_target, s_target


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="megatron-staged fit-rho", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--small", required=True, help="metric log of the small model trained from scratch")
    p.add_argument("--large", required=True, help="metric log of the large (target) model trained from scratch")
    p.add_argument("--at-iteration", type=int, default=None, help="the growth step S_pre (default: a table)")
    p.add_argument("--smooth", type=int, default=20, help="trailing-mean window over iterations")
    a = p.parse_args(argv)
    if a.smooth < 1:
        raise UserError("--smooth must be >= 1")
    if a.at_iteration is not None and a.at_iteration < 1:
        raise UserError(f"--at-iteration {a.at_iteration} must be >= 1 (the small run's iteration to grow at)")
    (small, b_small), (large, b_large) = read_run_losses(a.small), read_run_losses(a.large)
    if b_small and b_large and abs(b_small - b_large) > 1e-9 * max(b_small, b_large):
        raise UserError(f"the runs' global batches differ ({b_small:g} and {b_large:g} samples per iteration): rho "
                        f"compares steps at one batch size; train both with the same --global-batch-size")
    small, large = smooth(small, a.smooth), smooth(large, a.smooth)
    last = small[-1][0]
    points = [a.at_iteration] if a.at_iteration is not None else [max(1, int(last * f)) for f in (0.2, 0.4, 0.6, 0.8)]
    rhos = []
    for s_pre in points:
        r = rho_at(small, large, s_pre)
        if r is None:
            print(f"S_pre {s_pre}: the large run never reaches the small run's loss there")
            continue
        rhos.append(r[0])
        print(f"S_pre {s_pre}: large run reaches the small run's loss at S_target {r[1]}: rho = {r[0]:.3f}")
    if not rhos:
        raise UserError("no growth point where the large run reaches the small run's loss; train the large run longer")
    if len(rhos) > 1:
        print(f"median rho = {statistics.median(rhos):.3f}")
    return 0
