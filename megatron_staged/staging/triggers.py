"""When to grow: learning-curve slope triggers (Shen et al. 2022, "optimal schedule").

The slope of a learning curve in log-log space, ``s = d log L / d log C`` (loss against compute),
starts steep (very negative) after warm-up and rises towards 0 as the model saturates. The paper
grows the model (PRE-GROWTH) or stops (OPTIMALITY) at the first step after the slope's minimum
where ``s`` rises above a threshold; the thresholds below are the paper's.

Estimator: a least-squares line through ``(log10 C, log10 L)`` over a trailing window of the
curve, ``C in [C_now / window_ratio, C_now]``. Fitting a line over a window is the smoothing: it
averages the loss noise over every point in the window, so the estimate's noise falls with the
window's length; it estimates the slope at the window's centroid in log compute (second-order
error in the window's width), which is where :func:`windowed_slopes` reports it. A trigger thus
fires when the slope *at the centroid* crosses the threshold, about ``log10(window_ratio)/2``
decades before the newest point.

Compute axis: for the first stage, FLOPs so far (as executed). After a growth the grown model continues on the
*target* model's curve at schedule step ``S_target`` (see ``growth/apply.py``), so its curve is
placed at the compute a from-scratch run of the current model would have spent to get there:
``C = flops_per_iteration(current model) * S_target + FLOPs executed since the growth`` (executed:
with RaPTr's dropped layers the trainer counts only the layers that ran). This makes
the slope of each stage the slope of the curve the paper's thresholds were derived for (one model
trained from scratch), not of the run's cumulative compute, whose offset would flatten it.

A trigger is a pure function of the recorded curve, so a run resumed from a checkpoint (which
keeps the loss history) fires at the same iteration as the uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

# Slope thresholds (REFERENCE.md section 1): grow (PRE-GROWTH) or stop (OPTIMALITY) once s rises above.
THRESHOLDS = {"optimality": -0.052, "depth": -0.0575, "width": -0.0475, "depth+width": -0.03}


def loglog_slope(compute: Sequence[float], loss: Sequence[float]) -> float:
    """Least-squares slope of log10(loss) against log10(compute) (at least two distinct points)."""
    xs = [math.log10(c) for c in compute]
    ys = [math.log10(v) for v in loss]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0.0:
        raise ValueError("a slope needs at least two points at different compute")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def windowed_slopes(curve: Sequence[tuple[float, float]], window_ratio: float, min_points: int):
    """Slopes over the trailing windows of ``curve`` ((compute, loss), compute increasing).

    For every point: the least-squares slope of log10 L against log10 C over the points with
    ``C in [C_point / window_ratio, C_point]``, reported at the window's centroid in log compute
    (where a line fit estimates the slope). Returns two float arrays (centroid compute, slope),
    NaN where the window holds fewer than ``min_points`` points. O(n) through prefix sums.

    Early in a stage the window may reach back before the stage's first point: the estimate then
    uses the points there are (at least ``min_points``).
    """
    import numpy as np

    arr = np.asarray(curve, dtype=np.float64).reshape(-1, 2)
    c = arr[:, 0]
    x, y = np.log10(c), np.log10(arr[:, 1])
    prefix = [np.concatenate([[0.0], np.cumsum(v)]) for v in (x, y, x * x, x * y)]
    end = np.arange(1, len(c) + 1)
    start = np.searchsorted(c, c / window_ratio, side="left")
    n = (end - start).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my, mxx, mxy = ((p[end] - p[start]) / n for p in prefix)
        vxx, vxy = mxx - mx * mx, mxy - mx * my
        ok = (n >= min_points) & (vxx > 0)
        slope = np.where(ok, vxy / np.where(ok, vxx, 1.0), np.nan)
        centroid = np.where(ok, 10.0 ** mx, np.nan)
    return centroid, slope


@dataclass
class SlopeTrigger:
    """Fires at the first point after the slope's minimum where the slope rises above ``threshold``.

    ``patience`` consecutive estimates must lie above the threshold (noise must not fire it early);
    the minimum must lie below the threshold (a curve that never steepened has nothing to detect).
    """
    threshold: float
    window_ratio: float = 2.0
    min_points: int = 10
    patience: int = 3

    def first_firing(self, curve: Sequence[tuple[float, float]]) -> Optional[dict]:
        """The first point of ``curve`` where the trigger fires: its index, the slope there (and
        the compute it refers to), and the slope's minimum so far; None if it has not fired."""
        import numpy as np

        if len(curve) == 0:
            return None
        centroid, slope = windowed_slopes(curve, self.window_ratio, self.min_points)
        valid = ~np.isnan(slope)
        s_min = np.minimum.accumulate(np.where(valid, slope, np.inf))
        cond = valid & (slope > self.threshold) & (s_min < self.threshold)
        # length of the run of consecutive True values ending at each point (a NaN breaks a run)
        pos = np.arange(len(cond))
        run = pos - np.maximum.accumulate(np.where(cond, -1, pos))
        hits = np.nonzero(run >= self.patience)[0]
        if len(hits) == 0:
            return None
        i = int(hits[0])
        return {"index": i, "slope": float(slope[i]), "slope_min": float(s_min[i]),
                "slope_compute": float(centroid[i])}


def stage_curve(loss_history: Sequence[Sequence[float]], since_iteration: int, flops_per_iteration: float,
                schedule_step_at_start: int, flops_at_start: Optional[float] = None
                ) -> tuple[list[int], list[tuple[float, float]]]:
    """The current stage's curve on the from-scratch compute axis (see the module docstring).

    ``loss_history`` holds (iteration, loss, FLOPs so far); points at or before ``since_iteration``
    (the last growth) belong to an earlier model and are left out. Returns (iterations, curve).

    The compute of a point is ``flops_per_iteration * schedule_step_at_start`` (the from-scratch
    compute of the full current model up to where the growth placed it) plus the FLOPs the run
    *executed* since the growth, read from the history: with a RaPTr / layer-drop schedule the
    trainer counts only the executed layers, so the slope is taken against the compute actually
    spent, not against the full model's (which would overstate the compute and flatten the curve).
    Without layer dropping the two are the same, ``flops_per_iteration`` per iteration.
    ``flops_at_start``: the run's FLOPs so far at the growth (the stage history records it); else
    read from the history's point at the growth.
    """
    base = flops_at_start  # FLOPs so far at the growth (0 at the start of a run)
    if base is None:
        for it, _, flops in loss_history:
            if int(it) <= since_iteration:
                base = float(flops)
    if base is None and since_iteration == 0:
        base = 0.0
    its, curve = [], []
    for it, loss, flops in loss_history:
        it = int(it)
        if it <= since_iteration or not math.isfinite(loss) or loss <= 0:
            continue
        if base is None:  # the history does not reach back to the growth: full-model FLOPs per iteration
            spent = flops_per_iteration * (it - since_iteration)
        else:
            spent = float(flops) - base
        its.append(it)
        curve.append((flops_per_iteration * schedule_step_at_start + spent, float(loss)))
    return its, curve
