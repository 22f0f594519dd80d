"""What Adam does with moments that start at zero after a growth, and an option to correct it.

The problem (issue 8, item 7). A growth keeps the Adam step count ``t`` (docs/design.md) so that the
carried-over moments stay consistently bias-corrected. Elements whose moments are *new* — the
off-diagonal blocks of width growth, the zeroed ``linear_proj``/``linear_fc2`` of new identity
layers, fresh random layers — start from ``m = v = 0`` but are bias-corrected as if they had ``t``
steps of history. ``k`` steps after the growth, for a steady gradient ``g``::

    m_k = (1 - b1^k) g        v_k = (1 - b2^k) g^2
    update = lr * (m_k / (1 - b1^t)) / sqrt(v_k / (1 - b2^t))
           ~ lr * (1 - b1^k) / sqrt(1 - b2^k)                    (t large)

which is ``(1 - b1) / sqrt(1 - b2) ~ 3.2 x`` nominal at k = 1 with (0.9, 0.999), peaks near 6x
around k = 10-20, and is still ~2x at k = 200, for a late growth (large t). For the exact form,
multiply by ``sqrt(1 - b2^t)``: a growth at t = 100 sees about 0.3x of that, i.e. no overshoot
against a steady gradient (``benchmarks/fresh_moments.py`` measures it on real text).

The options (stage key / ``grow`` flag ``fresh_moments``):

* ``zero`` (default, as before): plain Adam at the kept step.
* ``bias-corrected``: elements whose ``m`` and ``v`` are both exactly zero right after the growth
  are bias-corrected with their own age ``k`` (steps since the growth) instead of ``t``: Adam as if
  those elements had started at the growth, which gives nominal-size updates. Carried-over elements
  are untouched (same update as ``zero``). Implemented optimizer-side, after the growth engine
  filled the state: a wrapper around the inner torch optimizer's ``step`` recomputes the update of
  the fresh elements from the moments that step produced (AdamW, decoupled weight decay, and
  L2-style Adam). The wrapper removes itself once ``k`` bias corrections agree with ``t``'s to 0.1%
  (``1 - b2^k`` reaches ``1 - b2^t``; ~ t steps at most, capped by ``max_iters``).

Limits: the fresh-element masks live in memory only; a run resumed from a checkpoint inside the
correction window continues with plain Adam (``zero``). An element that never had a gradient
before the growth (an unused vocabulary row) also counts as fresh, which is harmless: its update is
Adam's from its first gradient. Needs an optimizer that keeps its moments as ``exp_avg`` /
``exp_avg_sq`` in ``optimizer.state`` (torch Adam/AdamW, Transformer Engine's and apex's fused Adam);
the step is read per parameter (torch) or per parameter group (fused Adams).
"""
from __future__ import annotations

import math

import torch

from megatron_staged.errors import UserError

FRESH_MOMENTS = ("zero", "bias-corrected")


def _inner_optimizers(optimizer):
    opts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in opts]


def _step_of(inner, group, state) -> float:
    if "step" in state:
        return float(state["step"])
    if "step" in group:  # fused Adams (TE, apex) keep one step per parameter group
        return float(group["step"])
    raise UserError("fresh_moments: bias-corrected needs an Adam optimizer that records its step")


def _decoupled(inner, group) -> bool:
    if isinstance(inner, torch.optim.AdamW):
        return True
    if getattr(inner, "adam_w_mode", False):  # TE / apex FusedAdam
        return True
    return bool(group.get("decoupled_weight_decay", False))


def fresh_masks(optimizer) -> list:
    """[(inner optimizer, group, param, bool mask)] for every parameter with fresh elements."""
    out = []
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                if "exp_avg" not in st or "exp_avg_sq" not in st:
                    continue
                mask = (st["exp_avg"] == 0) & (st["exp_avg_sq"] == 0)
                if bool(mask.any()):
                    out.append((inner, group, p, mask))
    return out


class FreshMomentCorrection:
    """Per-element bias correction, counted from the growth, for elements with fresh moments."""

    def __init__(self, optimizer, max_iters: int = 10000):
        self.entries = fresh_masks(optimizer)
        self.inners = {id(e[0]): e[0] for e in self.entries}
        self.start = {}  # id(param) -> step at the growth
        for inner, group, p, _ in self.entries:
            self.start[id(p)] = _step_of(inner, group, inner.state[p])
        self.max_iters = max_iters
        self.steps = 0
        self._orig = {}
        for inner in self.inners.values():
            # (own attribute?, previous step): restore exactly what was there
            self._orig[id(inner)] = ("step" in vars(inner), inner.step)
            inner.step = self._make_step(inner)

    @property
    def num_fresh(self) -> int:
        return int(sum(int(m.sum()) for *_, m in self.entries))

    @property
    def active(self) -> bool:
        return bool(self._orig)

    def _make_step(self, inner):
        orig = inner.step

        def step(closure=None):
            mine = [e for e in self.entries if e[0] is inner]
            before = [p.detach()[m].clone() for _, _, p, m in mine]
            out = orig(closure)
            with torch.no_grad():
                for (_, group, p, m), p0 in zip(mine, before):
                    self._correct(inner, group, p, m, p0)
            return out
        return step

    def _correct(self, inner, group, p, mask, p0) -> None:
        st = inner.state[p]
        t = _step_of(inner, group, st)
        k = t - self.start[id(p)]
        if k <= 0:  # this step was skipped (e.g. an fp16 overflow): nothing moved
            return
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
        m = st["exp_avg"][mask].float()
        v = st["exp_avg_sq"][mask].float()
        upd = (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps)
        base = p0.float() * (1 - lr * wd) if (wd and _decoupled(inner, group)) else p0.float()
        p.data[mask] = (base - lr * upd).to(p.dtype)

    def after_step(self) -> None:
        """Call once per training iteration; removes the wrapper when it no longer matters."""
        self.steps += 1
        if not self.entries:
            self.remove()
            return
        inner, group, p, _ = self.entries[0]
        t = _step_of(inner, group, inner.state[p])
        k = max(t - self.start[id(p)], 1.0)
        b1, b2 = group["betas"]
        ratio = ((1 - b1 ** t) / (1 - b1 ** k)) * math.sqrt((1 - b2 ** k) / (1 - b2 ** t))
        if abs(ratio - 1) < 1e-3 or self.steps >= self.max_iters:
            self.remove()

    def remove(self) -> None:
        for inner in self.inners.values():
            if id(inner) in self._orig:
                own, prev = self._orig.pop(id(inner))
                if own:
                    inner.step = prev
                else:
                    del inner.step
        self._orig.clear()
        self.entries = []


def apply(optimizer, mode: str):
    """Install the chosen fresh-moment rule on a just-grown optimizer; returns the correction or None."""
    if mode not in FRESH_MOMENTS:
        raise UserError(f"fresh_moments {mode!r}: choose one of {', '.join(FRESH_MOMENTS)}")
    if mode == "zero":
        return None
    return FreshMomentCorrection(optimizer)
