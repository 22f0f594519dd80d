"""Which layers run at a step: RaPTr stage schedules, progressive layer dropping, and the draws.

Everything here is a pure function of the config, the seed, the iteration and the micro-batch
index, so every rank computes the same masks with no communication and a resumed run draws the
same layers again.

* **RaPTr** (Panigrahi et al. 2024): the run is cut into stages; stage ``s`` keeps each layer
  outside the fixed set ``I`` (default first and last) with probability ``p_s``; layers in ``I``
  always run. Stages are given as expected active layers (``--raptr-stages 6,8,10,12``:
  ``p_s = (k_s - |I|) / (L - |I|)``) or as keep-probabilities (``--raptr-keep-probs``). After the
  schedule's span (``--raptr-iters``, default ``--train-iters`` or the first growth stage) every
  layer runs.
* **PLD** (Zhang & He 2020, DeepSpeed): ``theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar``
  and layer ``l`` of ``L`` (1-based) is kept with ``p_l = 1 - (l / L)(1 - theta(t))``.

Layers are numbered 1..L globally (megatron's ``layer_number``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_staged.errors import UserError, require


def _floats(flag: str, text: str) -> list[float]:
    items = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    try:
        vals = [float(x) for x in items if x != ""]
    except ValueError:
        raise UserError(f"{flag}: cannot read {text!r} as comma-separated numbers (e.g. 6,8,10,12)") from None
    require(vals, f"{flag}: no values in {text!r}")
    return vals


def fixed_layers(spec: str, num_layers: int) -> list[int]:
    """The always-kept layers (1-based) named by ``--raptr-fixed-layers``."""
    out = set()
    for tok in str(spec).replace(" ", "").lower().split(","):
        if tok in ("", "none"):
            continue
        if tok == "first":
            out.add(1)
        elif tok == "last":
            out.add(num_layers)
        else:
            try:
                n = int(tok)
            except ValueError:
                raise UserError(f"--raptr-fixed-layers: {tok!r} is not first, last, none or a layer number") from None
            require(1 <= n <= num_layers,
                    f"--raptr-fixed-layers: layer {n} is not in 1..{num_layers} (layers are numbered from 1)")
            out.add(n)
    return sorted(x for x in out if num_layers >= 1)


@dataclass
class RaptrStage:
    start: int            # first iteration (0-based step index) of the stage
    iters: int
    keep_prob: float      # of each non-fixed layer
    expected_active: float


@dataclass
class LayerDropSchedule:
    """Keep-probabilities per global layer and step, and the seeded Bernoulli draws."""
    method: str                   # "raptr" or "pld"
    num_layers: int
    seed: int
    fixed: tuple = ()
    stages: tuple = ()            # RaptrStage, RaPTr only
    pld_theta: float = 0.5
    pld_gamma: float = 0.001
    rescale: bool = False
    draw_per: str = "iteration"   # or "micro-batch"

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def span(self) -> int:
        """Iterations after which every layer runs (RaPTr); PLD never ends."""
        if self.method == "pld":
            return math.inf
        return self.stages[-1].start + self.stages[-1].iters if self.stages else 0

    def stage_index(self, iteration: int) -> Optional[int]:
        """RaPTr stage of step ``iteration`` (0-based), None past the span (or for PLD)."""
        for i, s in enumerate(self.stages):
            if s.start <= iteration < s.start + s.iters:
                return i
        return None

    def keep_probs(self, iteration: int) -> torch.Tensor:
        """float64 [L]: keep-probability of each layer at step ``iteration``."""
        L = self.num_layers
        if self.method == "pld":
            theta = (1.0 - self.pld_theta) * math.exp(-self.pld_gamma * iteration) + self.pld_theta
            p = torch.tensor([1.0 - (l / L) * (1.0 - theta) for l in range(1, L + 1)], dtype=torch.float64)
            return p
        i = self.stage_index(iteration)
        p = torch.full((L,), 1.0 if i is None else self.stages[i].keep_prob, dtype=torch.float64)
        for l in self.fixed:
            p[l - 1] = 1.0
        return p

    def expected_active(self, iteration: int) -> float:
        return float(self.keep_probs(iteration).sum())

    # -- draws ------------------------------------------------------------------------------------
    def _seed(self, iteration: int, micro_batch: int) -> int:
        h = hashlib.sha256(f"{self.seed}/layer-drop/{iteration}/{micro_batch}".encode()).digest()
        return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)

    def mask(self, iteration: int, global_micro_batch: int = 0) -> torch.Tensor:
        """bool [L]: which layers run for this step and global micro-batch.

        ``global_micro_batch`` is the micro-batch's place in the global batch (local index *
        DP size + DP rank: megatron's sampler puts the same samples there at any DP size). With
        ``draw_per == "iteration"`` it is ignored: one draw for the whole global batch.
        """
        p = self.keep_probs(iteration)
        if bool((p >= 1.0).all()):
            return torch.ones(self.num_layers, dtype=torch.bool)
        mb = 0 if self.draw_per == "iteration" else global_micro_batch
        g = torch.Generator().manual_seed(self._seed(iteration, mb))
        u = torch.rand(self.num_layers, generator=g, dtype=torch.float64)
        return u < p

    def scale(self, iteration: int) -> torch.Tensor:
        """float64 [L]: the factor c on each kept layer's residual branch (1, or 1/p with rescale)."""
        p = self.keep_probs(iteration)
        return 1.0 / p if self.rescale else torch.ones_like(p)

    def masks_of_step(self, iteration: int, micro_batches: int) -> list[torch.Tensor]:
        """The masks of every global micro-batch of a step (one if drawn per iteration)."""
        if self.draw_per == "iteration":
            return [self.mask(iteration)]
        return [self.mask(iteration, g) for g in range(micro_batches)]


# ---- building and checking the schedule from the config ----------------------------------------

def enabled(cfg) -> bool:
    s = cfg.subnet
    return bool(s.raptr_stages or s.raptr_keep_probs or s.progressive_layer_drop)


def _first_growth_iteration(cfg) -> Optional[int]:
    """The iteration of the first growth stage; UserError when it is not known in advance."""
    stages = [st for st in (cfg.staging.stages or []) if isinstance(st, dict)]
    if not stages:
        return None
    first = stages[0]  # stages run in list order
    if isinstance(first.get("at_iteration"), int):
        return first["at_iteration"]
    require(cfg.subnet.raptr_iters is not None,
            "the first growth stage has no at_iteration (at_flops or a slope trigger), so the RaPTr schedule "
            "cannot end at it by default; give --raptr-iters")
    return None


def build_schedule(cfg) -> Optional[LayerDropSchedule]:
    """The layer-drop schedule of ``cfg`` (None when neither RaPTr nor PLD is on); UserError if bad."""
    from megatron_staged.training.flops import flops_per_iteration

    s, m = cfg.subnet, cfg.model
    if not enabled(cfg):
        return None
    L = m.num_layers
    require(not (s.progressive_layer_drop and (s.raptr_stages or s.raptr_keep_probs)),
            "--progressive-layer-drop and --raptr-stages/--raptr-keep-probs exclude each other; choose one")
    require(not (s.raptr_stages and s.raptr_keep_probs),
            "give --raptr-stages (expected active layers) or --raptr-keep-probs, not both")
    require(L >= 1, "layer dropping needs --num-layers >= 1")
    common = dict(num_layers=L, seed=cfg.training.seed, rescale=s.raptr_rescale, draw_per=s.raptr_draw_per)
    if s.progressive_layer_drop:
        require(0.0 < s.pld_theta <= 1.0, f"--pld-theta {s.pld_theta} must be in (0, 1]")
        require(s.pld_gamma >= 0.0, f"--pld-gamma {s.pld_gamma} must be >= 0")
        return LayerDropSchedule(method="pld", pld_theta=s.pld_theta, pld_gamma=s.pld_gamma, **common)

    fixed = fixed_layers(s.raptr_fixed_layers, L)
    free = L - len(fixed)
    if s.raptr_stages:
        ks = _floats("--raptr-stages", s.raptr_stages)
        for k in ks:
            require(len(fixed) <= k <= L,
                    f"--raptr-stages: {k:g} active layers is outside [{len(fixed)}, {L}] (the fixed layers "
                    f"{fixed or 'none'} always run, and the model has {L})")
        probs = [1.0 if free == 0 else (k - len(fixed)) / free for k in ks]
    else:
        probs = _floats("--raptr-keep-probs", s.raptr_keep_probs)
        for p in probs:
            require(0.0 <= p <= 1.0, f"--raptr-keep-probs: {p:g} is not a probability in [0, 1]")
    require(not s.raptr_rescale or min(probs) > 0.0,
            "--raptr-rescale divides by the keep-probability; a stage with keep-probability 0 cannot be rescaled")

    growth_at = _first_growth_iteration(cfg)
    span = s.raptr_iters if s.raptr_iters is not None else (growth_at if growth_at is not None
                                                            else cfg.training.train_iters)
    if s.raptr_stage_iters:
        given = _floats("--raptr-stage-iters", s.raptr_stage_iters)
        frac = next((x for x in given if x != int(x)), None)
        if frac is not None:
            raise UserError(f"--raptr-stage-iters: {frac:g} is not a whole number of iterations")
        lengths = [int(x) for x in given]
        require(len(lengths) == len(probs),
                f"--raptr-stage-iters has {len(lengths)} stages but the schedule has {len(probs)}; give one length per stage")
        require(all(n >= 0 for n in lengths), "--raptr-stage-iters: lengths must be >= 0")
        require(s.raptr_iters is None or sum(lengths) == s.raptr_iters,
                f"--raptr-stage-iters sum to {sum(lengths)}, not --raptr-iters {s.raptr_iters}; drop one of them")
    else:
        require(span >= 0, f"--raptr-iters {span} must be >= 0")
        if s.raptr_stage_split == "flops":
            # equal FLOPs per stage: a stage's length is inversely proportional to its step cost
            from megatron_staged.config import resolve_model

            resolve_model(m)
            cost = [flops_per_iteration(_with_vocab(m), 1, num_layers=len(fixed) + p * free) for p in probs]
            weights = [1.0 / c for c in cost]
        else:
            weights = [1.0] * len(probs)
        lengths = _split(span, weights)
    if growth_at is not None:
        require(sum(lengths) <= growth_at,
                f"the RaPTr schedule runs to iteration {sum(lengths)}, past the first growth stage at iteration "
                f"{growth_at}; end it by then (--raptr-iters {growth_at})")
    stages, start = [], 0
    for p, n in zip(probs, lengths):
        stages.append(RaptrStage(start=start, iters=n, keep_prob=p, expected_active=len(fixed) + p * free))
        start += n
    return LayerDropSchedule(method="raptr", fixed=tuple(fixed), stages=tuple(stages), **common)


def _with_vocab(m):
    """FLOPs need a vocabulary size; before the tokenizer is known the logit term is left out."""
    if m.padded_vocab_size is not None:
        return m
    import copy

    m = copy.copy(m)
    m.padded_vocab_size = 0
    return m


def _split(total: int, weights: list[float]) -> list[int]:
    """``total`` iterations in proportion to ``weights``, as integers summing to ``total``."""
    w = sum(weights)
    bounds = [round(total * sum(weights[:i + 1]) / w) for i in range(len(weights))]
    return [b - a for a, b in zip([0] + bounds[:-1], bounds)]


def validate_subnet(cfg, world_size: int) -> None:
    """Check the layer-drop flags at start (UserError with the fix)."""
    if not enabled(cfg):
        return
    build_schedule(cfg)
    p = cfg.parallel
    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    if cfg.subnet.raptr_draw_per == "micro-batch" and p.overlap_grad_reduce and dp > 1:
        # DP replicas would drop different layers in their last micro-batch, so megatron's buckets
        # would become ready, and launch their collectives, in a different order on each replica.
        raise UserError("--raptr-draw-per micro-batch with --overlap-grad-reduce at data-parallel size > 1 "
                        "would issue gradient collectives in a different order per replica; use "
                        "--raptr-draw-per iteration or drop --overlap-grad-reduce")


def mean_active_layers(cfg, start: int, end: int) -> "Optional[float]":
    """Expected transformer layers run per micro-batch, averaged over iterations ``start..end-1``
    (0-based), under ``cfg``'s RaPTr / PLD schedule; None when layer dropping is off. The planner's
    FLOPs count these, as the trainer's FLOPs count the layers that ran."""
    schedule = build_schedule(cfg) if enabled(cfg) else None
    if schedule is None or end <= start:
        return None
    L = schedule.num_layers
    n = end - start
    if schedule.method == "pld":
        # sum_l p_l(t) = L - (1 - theta(t)) (L + 1) / 2, with 1 - theta(t) = (1 - theta_bar)(1 - exp(-gamma t))
        g = schedule.pld_gamma
        if g == 0.0:
            mean_exp = 1.0
        else:
            mean_exp = (math.exp(-g * start) - math.exp(-g * end)) / (1.0 - math.exp(-g)) / n
        return L - (1.0 - schedule.pld_theta) * (1.0 - mean_exp) * (L + 1) / 2.0
    total, covered = 0.0, 0
    for st in schedule.stages:
        overlap = max(0, min(end, st.start + st.iters) - max(start, st.start))
        total += overlap * st.expected_active
        covered += overlap
    return (total + (n - covered) * L) / n
