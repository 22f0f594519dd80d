"""fresh_moments: bias-corrected (megatron_staged/growth/fresh_moments.py), on plain torch optimizers.

Reference: the fresh elements must move exactly as a torch AdamW *started at the growth* (its own
step count) fed the same gradients; the carried-over elements exactly as the AdamW that keeps the
step. Also for a fused-Adam-like optimizer that keeps ``step`` per parameter group (Transformer
Engine / apex structure, simulated on CPU), and the size of the updates with and without the fix.
"""
from __future__ import annotations

import torch

from megatron_staged.growth.fresh_moments import FreshMomentCorrection, apply

T, K = 5000, 40
B1, B2, EPS, WD, LR = 0.9, 0.999, 1e-8, 0.1, 1e-2


class GroupStepAdamW(torch.optim.Optimizer):
    """AdamW that keeps one ``step`` per parameter group, like TE's / apex's FusedAdam."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adam_w_mode = True

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
            b1, b2 = g["betas"]
            for p in g["params"]:
                st = self.state[p]
                st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.mul_(1 - g["lr"] * g["weight_decay"])
                den = (st["exp_avg_sq"] / (1 - b2 ** g["step"])).sqrt() + g["eps"]
                p.addcdiv_(st["exp_avg"] / (1 - b1 ** g["step"]), den, value=-g["lr"])


def _grown_state(group_step: bool):
    """A parameter at step T whose second half of columns was just grown (zero moments)."""
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    fresh = torch.zeros(8, 6, dtype=torch.bool)
    fresh[:, 3:] = True
    w[fresh] = 0.0
    m = torch.randn(8, 6) * 1e-3
    v = torch.rand(8, 6) * 1e-6 + 1e-7
    m[fresh], v[fresh] = 0.0, 0.0
    p = torch.nn.Parameter(w.clone())
    if group_step:
        opt = GroupStepAdamW([p], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
        opt.param_groups[0]["step"] = T
        opt.state[p] = {"exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    else:
        opt = torch.optim.AdamW([p], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
        opt.state[p] = {"exp_avg": m.clone(), "exp_avg_sq": v.clone(), "step": torch.tensor(float(T))}
    return p, opt, fresh, w, m, v


def _reference(w, m, v, fresh, grads):
    """Two independent torch AdamWs: the kept one (step T) and one started at the growth (step 0)."""
    kept = torch.nn.Parameter(w.clone())
    ok = torch.optim.AdamW([kept], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    ok.state[kept] = {"exp_avg": m.clone(), "exp_avg_sq": v.clone(), "step": torch.tensor(float(T))}
    new = torch.nn.Parameter(w.clone())
    on = torch.optim.AdamW([new], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for g in grads:
        kept.grad, new.grad = g.clone(), g.clone()
        ok.step()
        on.step()
    return torch.where(fresh, new.detach(), kept.detach())


def _grads():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=gen) * 1e-2
    return [base + 1e-3 * torch.randn(8, 6, generator=gen) for _ in range(K)]


def test_bias_corrected_equals_adam_started_at_growth():
    for group_step in (False, True):
        p, opt, fresh, w, m, v = _grown_state(group_step)
        corr = apply(opt, "bias-corrected")
        assert isinstance(corr, FreshMomentCorrection) and corr.num_fresh == int(fresh.sum())
        grads = _grads()
        for g in grads:
            p.grad = g.clone()
            opt.step()
            corr.after_step()
        want = _reference(w, m, v, fresh, grads)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7,
                                   msg=lambda s: f"group_step={group_step}: {s}")


def test_zero_moments_overshoot_and_the_fix_removes_it():
    """With the kept step, fresh elements move ~(1-b1^k)/sqrt(1-b2^k) x nominal (3x at k=1, >4x at k=10)."""
    grads = _grads()
    sizes = {}
    for mode in ("zero", "bias-corrected"):
        p, opt, fresh, *_ = _grown_state(False)
        corr = apply(opt, mode)
        steps = []
        for g in grads:
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            if corr:
                corr.after_step()
            moved = (p.detach() - before * (1 - LR * WD))[fresh]
            steps.append(float(moved.abs().mean() / LR))
        sizes[mode] = steps
    assert sizes["zero"][0] > 2.5 and max(sizes["zero"][:20]) > 4.0, sizes["zero"][:20]
    assert max(sizes["bias-corrected"]) < 1.05, sizes["bias-corrected"][:20]


def test_correction_removes_itself():
    p, opt, fresh, *_ = _grown_state(False)
    corr = FreshMomentCorrection(opt, max_iters=3)
    assert "step" in vars(opt)
    for g in _grads()[:3]:
        p.grad = g
        opt.step()
        corr.after_step()
    assert not corr.active and "step" not in vars(opt)
