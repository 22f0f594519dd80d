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

Checkpoints: while a correction is active, every save also writes the masks, one uint8 tensor per
parameter in model space, sharded like the parameter (``optimizer.fresh_moments.mask.<key>``), and
the optimizer step of the growth (``common.pt``: ``fresh_moments.start_step``), so a run resumed
inside the correction window, at any layout, continues the correction exactly (``save_tensors`` /
``loaded_tensors``; the checkpoint manager calls them). An element that never had a gradient
before the growth (an unused vocabulary row) also counts as fresh, which is harmless: its update is
Adam's from its first gradient. Needs an optimizer that keeps its moments as ``exp_avg`` /
``exp_avg_sq`` in ``optimizer.state`` (torch Adam/AdamW, Transformer Engine's and apex's fused Adam);
the step is read per parameter (torch) or per parameter group (fused Adams).
"""
from __future__ import annotations

import math
from typing import Optional

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
    """Per-element bias correction, counted from the growth, for elements with fresh moments.

    ``saved``: ``{id(main param): (mask, step at the growth)}`` read from a checkpoint (a resume
    inside the correction window); by default the masks are the elements with zero moments now.
    """

    def __init__(self, optimizer, max_iters: int = 10000, saved: dict | None = None):
        self.start = {}  # id(param) -> step at the growth
        if saved is None:
            self.entries = fresh_masks(optimizer)
            for inner, group, p, _ in self.entries:
                self.start[id(p)] = _step_of(inner, group, inner.state[p])
        else:
            self.entries = []
            for inner in _inner_optimizers(optimizer):
                for group in inner.param_groups:
                    for p in group["params"]:
                        if id(p) in saved:
                            mask, start = saved[id(p)]
                            self.entries.append((inner, group, p, mask))
                            self.start[id(p)] = start
        self.inners = {id(e[0]): e[0] for e in self.entries}
        self.optimizer = optimizer
        optimizer.fresh_moment_correction = self  # what a checkpoint save writes (save_tensors)
        self.max_iters = max_iters
        self.steps = 0
        if self.entries:  # steps since the growth (a resumed correction has run some already)
            inner, group, p, _ = self.entries[0]
            self.steps = int(_step_of(inner, group, inner.state[p]) - self.start[id(p)])
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
        if getattr(self.optimizer, "fresh_moment_correction", None) is self:
            self.optimizer.fresh_moment_correction = None


def apply(optimizer, mode: str):
    """Install the chosen fresh-moment rule on a just-grown optimizer; returns the correction or None."""
    if mode not in FRESH_MOMENTS:
        raise UserError(f"fresh_moments {mode!r}: choose one of {', '.join(FRESH_MOMENTS)}")
    if mode == "zero":
        return None
    return FreshMomentCorrection(optimizer)


def resume(optimizer):
    """The correction a checkpoint saved inside its window (``loaded_tensors`` put it on the
    optimizer), installed again; None if the checkpoint held none."""
    saved = getattr(optimizer, "fresh_moments_loaded", None)
    if not saved:
        return None
    optimizer.fresh_moments_loaded = None
    return FreshMomentCorrection(optimizer, saved=saved)


# ---- checkpoints: the masks in model space, sharded like the parameters ---------------------------

SAVE_PREFIX = "optimizer.fresh_moments.mask."


def param_links(optimizer) -> list:
    """[(inner optimizer's param, model param, flat slice of the model param it holds, or None: all)]."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    out = []
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(part, "optimizer", part)
        if isinstance(part, DistributedOptimizer):
            for model_param, (gi, go) in part.model_param_group_index_map.items():
                r = part._get_model_param_range_map(model_param)["param"]
                out.append((inner.param_groups[gi]["params"][go], model_param, slice(r.start, r.end)))
        elif hasattr(part, "fp32_from_float16_groups"):
            for mg, fg in zip(part.float16_groups, part.fp32_from_float16_groups):
                out += [(main, mp, None) for mp, main in zip(mg, fg)]
            out += [(p, p, None) for g in part.fp32_from_fp32_groups for p in g]
        else:
            out += [(p, p, None) for g in inner.param_groups for p in g["params"]]
    return out


def _model_space(model_sd: dict) -> dict:
    """{model param: its ShardedTensor (or factory)} from a model sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_sd)
    return {sh.data: sh for sh in nested_values(tensors)}


def _as(sh, key: str, data: torch.Tensor):
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    kw = dict(key=key, data=data)
    if not isinstance(sh, ShardedTensorFactory):
        kw["dtype"] = data.dtype
    return replace(sh, **kw)


def save_tensors(optimizer, model_sd: dict) -> tuple[dict, Optional[float]]:
    """The active correction's masks as sharded tensors to save, and the optimizer step of the
    growth; ``({}, None)`` when no rank has an active correction. Collective (every rank calls it).

    When any rank has one, every parameter gets a mask (uint8, zeros where nothing is fresh), so
    that each saved tensor is covered whole; the distributed optimizer holds each mask in
    disjoint data-parallel pieces, joined with a sum over the data-parallel group.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    corr = getattr(optimizer, "fresh_moment_correction", None)
    if corr is not None and corr.active and corr.entries:
        masks = {id(p): m for _, _, p, m in corr.entries}
        mine = max(corr.start.values())
    else:  # loaded but not (yet) installed, e.g. by `convert`: carried over as they are
        loaded = getattr(optimizer, "fresh_moments_loaded", None) or {}
        masks = {k: m for k, (m, _) in loaded.items()}
        mine = max((st for _, st in loaded.values()), default=-1.0)
    sharded = _model_space(model_sd)
    params = [mp for mp in sharded if mp.requires_grad]  # the same order on every DP rank
    device = params[0].device if params else torch.device("cpu")
    start = torch.tensor([float(mine)], dtype=torch.float64, device=device)
    dist.all_reduce(start, op=dist.ReduceOp.MAX)
    if start.item() < 0:
        return {}, None
    by_model = {}
    for main, model_param, sl in param_links(optimizer):
        if id(main) in masks:
            flat = by_model.setdefault(model_param, torch.zeros(model_param.numel(), dtype=torch.float32, device=device))
            (flat if sl is None else flat[sl]).copy_(masks[id(main)].reshape(-1).float())
    group = ps.get_data_parallel_group(with_context_parallel=True)
    out = {}
    for i, mp in enumerate(params):  # keyed by position: each layer of a stacked key is its own entry
        flat = by_model.get(mp, torch.zeros(mp.numel(), dtype=torch.float32, device=device))
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)  # disjoint pieces: the sum is the union
        sh = sharded[mp]
        out[str(i)] = _as(sh, SAVE_PREFIX + sh.key, (flat > 0).to(torch.uint8).reshape(mp.shape))
    return out, float(start.item())


def load_templates(model_sd: dict) -> dict:
    """Sharded tensors to load saved masks into (a checkpoint that has them has one per parameter)."""
    params = [(mp, sh) for mp, sh in _model_space(model_sd).items() if mp.requires_grad]
    return {str(i): _as(sh, SAVE_PREFIX + sh.key, torch.zeros(mp.shape, dtype=torch.uint8, device=mp.device))
            for i, (mp, sh) in enumerate(params)}


def loaded_tensors(optimizer, model_sd: dict, loaded: dict, start: float) -> None:
    """Hand the loaded masks to the optimizer (``resume`` installs the correction from them)."""
    key_of = {id(mp): str(i) for i, mp in enumerate(mp for mp in _model_space(model_sd) if mp.requires_grad)}
    saved = {}
    for main, model_param, sl in param_links(optimizer):
        key = key_of.get(id(model_param))
        if key is None or key not in loaded:
            continue
        flat = loaded[key].reshape(-1)
        mask = (flat if sl is None else flat[sl]).bool().reshape(main.shape)
        if bool(mask.any()):
            saved[id(main)] = (mask.to(main.device), start)
    optimizer.fresh_moments_loaded = saved
