"""``plan --mode kaplan``: a staged schedule and its predicted compute saving from Kaplan's L(N, S).

Shen et al. 2022 ("Staged training for transformer language models", section 5) schedule growth
with Kaplan et al.'s learning-curve law for a model of ``N`` non-embedding parameters after ``S``
steps::

    L(N, S) = (N_c / N) ** 0.076 + (S_c / S) ** 0.76,   N_c = 8.8e13, S_c = 2.1e3,  N = 12 L d^2

and compute ``C = 6 N B S``. Along one model's curve ``d log C = d log S``, so the slope is
``s(S) = d log L / d log C = -0.76 x / (a + x)`` with ``a = (N_c/N)^0.076``, ``x = (S_c/S)^0.76``:
it rises from -0.76 towards 0, and the step where it crosses a threshold ``t`` is closed-form,
``x = -t a / (0.76 + t)``, ``S = S_c / x^(1/0.76)``.

The schedule, for a recipe of growths ending at the *target* model (the model flags):

* stage 0 (the target divided by every growth) trains from step 0 to its PRE-GROWTH step ``S_pre``:
  where its slope rises above the next growth's threshold (depth -0.0575, width -0.0475,
  depth+width -0.03; staging/triggers.py's ``THRESHOLDS``);
* a growth puts the next model at ``S_target``, the step where that model trained from scratch
  reaches the loss just reached (the growth is loss- and dynamics-preserving), so
  ``rho = S_pre / S_target`` (or ``S_target = S_pre / rho`` with ``--rho``, e.g. the paper's fitted
  1.4 for depth and 1.8 for width);
* each later stage trains to its own PRE-GROWTH step (at least ``S_target``: a model that arrives
  already past it grows at once), the last one to the target's OPTIMALITY step ``S_opt`` (slope
  -0.052), where a from-scratch target run would stop.

Both runs end at the same loss ``L(N_target, S_opt)``; the saving is
``1 - sum_k 6 N_k B (S_end,k - S_start,k) / (6 N_target B S_opt)`` (for one growth:
``[C_large(S_target) - C_small(S_pre)] / C_large(S_opt)``, REFERENCE.md section 1).

Kaplan's absolute step counts (fitted on WebText2 at batches near the critical batch) do not carry
over to another corpus, tokenizer or batch, so the planner places the schedule on the run's
iterations by proportion: the staged run's ``--train-iters`` (or ``--train-tokens``) covers the
whole staged schedule, and every growth happens at the same fraction of it as in Kaplan steps.
The from-scratch target reaching the same loss needs ``S_opt / (total Kaplan steps)`` of that
budget. Ratios (rho, savings, fractions) are what the law predicts; the iterations are a mapping.
docs/scaling.md compares the figures with the paper's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from megatron_staged.errors import UserError, require
from megatron_staged.staging.triggers import THRESHOLDS

N_C, S_C, ALPHA_N, ALPHA_S = 8.8e13, 2.1e3, 0.076, 0.76


def kaplan_loss(n: float, s: float) -> float:
    return (N_C / n) ** ALPHA_N + (S_C / s) ** ALPHA_S


def step_at_slope(n: float, threshold: float) -> float:
    """The step where the slope of model ``n``'s curve rises above ``threshold`` (< 0)."""
    require(-ALPHA_S < threshold < 0, f"a slope threshold must lie in (-0.76, 0), not {threshold}")
    x = -threshold * (N_C / n) ** ALPHA_N / (ALPHA_S + threshold)
    return S_C / x ** (1.0 / ALPHA_S)


def step_at_loss(n: float, loss: float) -> float:
    """The step where model ``n`` trained from scratch reaches ``loss`` (inf if it never does)."""
    gap = loss - (N_C / n) ** ALPHA_N
    return S_C / gap ** (1.0 / ALPHA_S) if gap > 0 else math.inf


_GROWTH = re.compile(r"^(?P<factors>(\d+x)+)(?P<ops>[DW](x[DW])?)$", re.IGNORECASE)


def parse_growths(text: str) -> list[dict]:
    """``2xD`` -> [{depth_factor: 2}]; ``2x2xD`` -> two depth doublings; ``2xDxW`` -> one growth of
    both; ``4xW``; comma-separated items run in order (``2xD,2xW``)."""
    out = []
    for item in [x.strip() for x in str(text).split(",") if x.strip()]:
        m = _GROWTH.match(item)
        if m is None:
            raise UserError(f"growth recipe item {item!r}: write e.g. 2xD, 2xW, 2x2xD, 2xDxW (factors, then D and/or W)")
        factors = [int(f) for f in m.group("factors").rstrip("x").split("x")]
        ops = {op.upper() for op in m.group("ops").split("x")}
        require(all(f >= 2 for f in factors), f"growth recipe item {item!r}: factors must be >= 2")
        require(len(factors) == 1 or len(ops) == 1,
                f"growth recipe item {item!r}: repeat one operator (2x2xD) or grow both once (2xDxW)")
        for f in factors:
            out.append({**({"depth_factor": f} if "D" in ops else {}), **({"width_factor": f} if "W" in ops else {})})
    require(out, "the growth recipe is empty; e.g. 2xD")
    return out


def is_growth_recipe(text: str) -> bool:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    return bool(items) and all(_GROWTH.match(x) for x in items)


def operator_of(growth: dict) -> str:
    d, w = growth.get("depth_factor", 1) > 1, growth.get("width_factor", 1) > 1
    return "depth+width" if d and w else ("depth" if d else "width")


@dataclass
class KaplanStage:
    index: int
    num_layers: int
    hidden_size: int
    params: float                 # non-embedding, 12 L d^2
    growth: Optional[dict]        # the growth that created this stage (None: the initial model)
    rho: Optional[float]          # S_pre of the previous stage / S_target of this one
    kaplan_start: float           # Kaplan steps on this model's own from-scratch curve
    kaplan_end: float
    loss_end: float
    start_iteration: int = 0      # on the run's iterations (see the module docstring)
    end_iteration: int = 0
    flops: float = 0.0            # 6 N x tokens of this stage

    @property
    def kaplan_steps(self) -> float:
        return self.kaplan_end - self.kaplan_start


@dataclass
class KaplanPlan:
    stages: list
    target_params: float
    kaplan_opt: float             # the target's OPTIMALITY step
    scratch_iterations: float     # iterations a from-scratch target needs to the same loss
    scratch_flops: float
    staged_flops: float
    tokens_per_iteration: int

    @property
    def saving(self) -> float:
        return 1.0 - self.staged_flops / self.scratch_flops

    def yaml_stages(self) -> list[dict]:
        """staging.stages for a run of the initial model: growth at the planned iterations, each with the
        rho this schedule assumed (without it the trainer would jump the LR schedule by its default rho)."""
        return [dict(st.growth, at_iteration=st.start_iteration,
                     **({} if st.rho is None else {"rho": round(st.rho, 4)})) for st in self.stages[1:]]


def plan_kaplan(num_layers: int, hidden_size: int, growths: list[dict], train_iters: int, tokens_per_iteration: int,
                rho: Optional[float] = None, thresholds: Optional[dict] = None) -> KaplanPlan:
    """The schedule of ``growths`` ending at a ``num_layers`` x ``hidden_size`` target (see module)."""
    th = dict(THRESHOLDS, **(thresholds or {}))
    require(rho is None or rho > 0, f"--rho {rho} must be positive")
    require(train_iters >= 1, "the run needs --train-iters (or --train-tokens) >= 1")
    shapes = [(num_layers, hidden_size)]
    for g in reversed(growths):
        L, d = shapes[0]
        fd, fw = g.get("depth_factor", 1), g.get("width_factor", 1)
        require(L % fd == 0 and d % fw == 0, f"the target ({num_layers} layers, hidden {hidden_size}) cannot be "
                                             f"divided by the recipe's growths (x{fd} depth, x{fw} width)")
        shapes.insert(0, (L // fd, d // fw))
    n_target = 12.0 * num_layers * hidden_size ** 2
    s_opt = step_at_slope(n_target, th["optimality"])
    stages, start, loss, prev_end = [], 0.0, None, None
    for k, (L, d) in enumerate(shapes):
        n = 12.0 * L * d * d
        g = growths[k - 1] if k else None
        r = None
        if k:
            start = prev_end / rho if rho is not None else step_at_loss(n, loss)
            r = prev_end / start
        end = s_opt if k == len(shapes) - 1 else max(start, step_at_slope(n, th[operator_of(growths[k])]))
        if k == len(shapes) - 1 and end < start:
            raise UserError(f"the last growth puts the target at Kaplan step {start:.0f}, past its OPTIMALITY step "
                            f"{s_opt:.0f}: nothing is left to train (the recipe grows too late to save compute)")
        loss = kaplan_loss(n, end)
        stages.append(KaplanStage(k, L, d, n, g, r, start, end, loss))
        prev_end = end
    total = sum(st.kaplan_steps for st in stages)
    scale = train_iters / total                         # run iterations per Kaplan step
    at = 0.0
    for st in stages:
        st.start_iteration = int(round(at * scale))
        at += st.kaplan_steps
        st.end_iteration = int(round(at * scale))
        st.flops = 6.0 * st.params * tokens_per_iteration * st.kaplan_steps * scale
    scratch_its = s_opt * scale
    return KaplanPlan(stages, n_target, s_opt, scratch_its, 6.0 * n_target * tokens_per_iteration * scratch_its,
                      sum(st.flops for st in stages), tokens_per_iteration)


def kaplan_report(plan: KaplanPlan) -> str:
    rows = [("stage", "layers", "hidden", "params (12Ld^2)", "growth", "rho", "Kaplan steps", "iterations",
             "loss (Kaplan)", "FLOPs (6NBS)")]
    for st in plan.stages:
        growth = "initial" if st.growth is None else "+".join(f"{k.split('_')[0]}x{v}" for k, v in st.growth.items())
        rows.append((str(st.index), str(st.num_layers), str(st.hidden_size), f"{st.params:.4g}", growth,
                     "" if st.rho is None else f"{st.rho:.3f}", f"{st.kaplan_start:.0f}-{st.kaplan_end:.0f}",
                     f"{st.start_iteration}-{st.end_iteration}", f"{st.loss_end:.4f}", f"{st.flops:.4g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines += ["",
              f"from scratch: the target ({plan.target_params:.4g} params) reaches the same loss at its OPTIMALITY "
              f"step {plan.kaplan_opt:.0f} = iteration {plan.scratch_iterations:.0f}, {plan.scratch_flops:.4g} FLOPs",
              f"staged: {plan.staged_flops:.4g} FLOPs over {plan.stages[-1].end_iteration} iterations; "
              f"predicted saving {100 * plan.saving:.1f}% of the from-scratch FLOPs",
              "staging.stages (for the initial model): " + str(plan.yaml_stages())]
    return "\n".join(lines)


def add_kaplan_flags(p) -> None:
    g = p.add_argument_group("kaplan mode (the model flags describe the TARGET model)")
    g.add_argument("--rho", type=float, default=None,
                   help="S_pre / S_target at every growth instead of Kaplan's (the paper fitted 1.4 depth, 1.8 width)")


def run_kaplan(args, cfg) -> int:
    from megatron_staged.config import resolve_model

    recipe = getattr(args, "recipe", None)
    require(recipe, "--mode kaplan needs a growth recipe: --stages 2xD (or 2xW, 2x2xD, 2x2xW, 2xDxW, ...)")
    m, t = cfg.model, cfg.training
    resolve_model(m)
    require(t.global_batch_size, "--mode kaplan needs --global-batch-size")
    require(t.train_iters, "--mode kaplan needs --train-iters or --train-tokens (the staged run's budget)")
    plan = plan_kaplan(m.num_layers, m.hidden_size, parse_growths(recipe), t.train_iters,
                       t.global_batch_size * m.seq_length, rho=args.rho)
    print(kaplan_report(plan))
    return 0
