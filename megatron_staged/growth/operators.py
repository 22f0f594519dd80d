"""Growth operators on *global* tensors of one layer (the maths, independent of any layout).

Tensors are named by their megatron-core checkpoint key (``decoder.layers.`` keys refer to one
layer: the leading layer axis is removed). ``kind`` says which training-state tensor it is:
``param`` (model weight or the optimizer's fp32 copy), ``exp_avg`` (Adam m) or ``exp_avg_sq``
(Adam v), or ``momentum_buffer`` (Muon's momentum, grown exactly as Adam's m). Shapes use h = hidden, G = query groups, q = heads per group, d = head size, f = FFN.

Width x2 is written as index maps (``width_rule``, ``width_pieces``, ``grow_region``): along each
axis, runs of target indices read runs of source indices of copy 0 or 1, so a rank growing one
shard (a rectangular region of the grown tensor) reads only the source boxes it needs; the whole
tensor (``grow_width``) is the region that covers it all.

Width x2 (Shen et al. 2022), exact: matrices become block-diagonal ``[[W,0],[0,W]]`` per fused
chunk (each query group's [q.., k, v] rows; SwiGLU's gate and up halves separately), vectors and
embeddings are duplicated ``[b, b]``; heads H..2H-1 (groups G..2G-1) read the second copy of the
hidden state. The last representation is split ``[alpha*y, (1-alpha)*y]`` (final norm when the
output layer is tied, else the output layer) so logits are unchanged for any alpha.

Symmetry breaking: with alpha != 1/2 the two copies receive gradients alpha*g and (1-alpha)*g,
while their carried-over Adam moments are equal (m/2, v/4), so their updates differ and the copies
diverge, with the function exact at the growth. (alpha = 1/2 keeps them identical forever under
Adam, which is invariant to the gradient's scale.) ``width_noise`` optionally adds N(0, std^2) to
the new zero blocks (not exact).

Moments (REFERENCE.md): grown like their parameter, then m/2 and v/4 (each copy receives half the
gradient, so m/sqrt(v) is preserved); new zero blocks get zero moments; the tensor that carries
the alpha split (final norm if tied, output layer if untied) receives the full gradient, so its
moments are duplicated unscaled.

Depth: a new layer is a copy of its source layer. ``identity`` init zeroes the residual-branch
outputs (attention ``linear_proj`` and ``linear_fc2``, weights and biases) so the block is an
identity; those zeroed tensors get zero moments (they are new zero blocks), every other tensor of
the layer gets a copy of the source layer's moments. ``random`` layers keep the target model's own
initialisation and get zero moments.

Expansion (Bu 2025, docs/zero_one_layer.md): ``copy-stack`` / ``copy-interleave`` / ``copy-last``
are ``copy`` with that placement (weights and moments copied exactly; the spec resolves them);
``zero`` layers are ``random`` layers whose residual outputs (weights, biases and their moments)
are zero, so the expanded model computes the same function.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Optional

import torch

RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")

# Muon's momentum_buffer is, like Adam's m, an EMA of the gradient: it is grown as m is (docs/muon.md)
MOMENT_SCALE = {"param": 1.0, "exp_avg": 0.5, "exp_avg_sq": 0.25, "momentum_buffer": 0.5}


def layer_suffix(key: str) -> str:
    return key[len("decoder.layers."):] if key.startswith("decoder.layers.") else key


def is_residual_output(key: str) -> bool:
    return layer_suffix(key) in RESIDUAL_OUTPUTS


def _noise(shape, std: float, seed: int, key: str, layer: int) -> torch.Tensor:
    h = hashlib.sha256(f"noise/{seed}/{key}/{layer}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g) * std


# ---- width x2 as index maps -----------------------------------------------------------------------
# Along each axis a grown tensor is a list of runs: target indices [t, t+n) take source indices
# [s, s+n) of copy c. A target region is then a product of runs per axis; each product either reads
# one source box (times a scale) or, in a block-diagonal matrix whose row and column copies differ,
# is a new zero block. So a rank growing one shard needs exactly the source boxes its pieces name.

@dataclass(frozen=True)
class Run:
    """Target indices [target, target+length) <- source [source, source+length) of ``copy``
    (``None``: the axis is not doubled)."""
    target: int
    source: int
    length: int
    copy: Optional[int]


def kept_axis(n: int) -> list:
    """An axis that does not grow (the vocabulary, sequence positions)."""
    return [Run(0, 0, n, None)]


def doubled_axis(n: int) -> list:
    """[x] -> [x, x]: hidden, heads (query groups are contiguous, so QKV rows double as a whole), FFN."""
    return [Run(0, 0, n, 0), Run(n, 0, n, 1)]


def doubled_halves_axis(n: int) -> list:
    """SwiGLU's fused [gate; up] (n = 2f) -> [gate, gate; up, up]: each half doubled on its own."""
    f = n // 2
    return [Run(0, 0, f, 0), Run(f, 0, f, 1), Run(2 * f, f, f, 0), Run(3 * f, f, f, 1)]


AXES = {"kept": kept_axis, "doubled": doubled_axis, "doubled_halves": doubled_halves_axis}


@dataclass(frozen=True)
class WidthRule:
    """How one tensor grows: per-axis maps, a value scale per copy, and whether it is a
    block-diagonal matrix (entries whose row and column copies differ are new: zero or noise)."""
    axes: tuple
    scale: tuple = (1.0, 1.0)
    block_diagonal: bool = False


def carries_split(key: str, tied: bool) -> bool:
    """Is this the tensor that takes the alpha split (and the full gradient)?"""
    if tied:
        return key.startswith("decoder.final_layernorm.")
    return key == "output_layer.weight"


def width_rule(key: str, kind: str, ndim: int, *, swiglu: bool, tied: bool, alpha: float) -> WidthRule:
    """The width x2 rule of one global tensor (``ndim`` without the layer axis)."""
    sfx = layer_suffix(key)
    if carries_split(key, tied):
        # [alpha*y, (1-alpha)*y]; each copy receives the full gradient: moments duplicated unscaled
        scale = (alpha, 1.0 - alpha) if kind == "param" else (1.0, 1.0)
        return WidthRule(("kept", "doubled") if ndim == 2 else ("doubled",), scale)
    if sfx.startswith(("self_attention.q_layernorm.", "self_attention.k_layernorm.")):
        # --qk-layernorm: one norm over the head size, shared by all heads; the head size does not grow,
        # and the gradient it gets from the two copies sums to the source's: weights and moments kept
        return WidthRule(("kept",))
    m = MOMENT_SCALE[kind]  # each copy receives half the gradient: m/2, v/4
    if sfx in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return WidthRule(("doubled", "doubled"), (m, m), block_diagonal=True)
    if sfx == "mlp.linear_fc1.weight":
        return WidthRule(("doubled_halves" if swiglu else "doubled", "doubled"), (m, m), block_diagonal=True)
    if sfx == "mlp.linear_fc1.bias" and swiglu:
        return WidthRule(("doubled_halves",), (m, m))
    if key in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight", "output_layer.weight"):
        return WidthRule(("kept", "doubled"), (m, m))
    if ndim == 1:  # norms' gamma/beta, linear biases (QKV's bias is group-major: doubles as a whole)
        return WidthRule(("doubled",), (m, m))
    raise KeyError(f"no width rule for checkpoint key {key!r} ({ndim}-D)")




def grown_shape(rule: Optional[WidthRule], source_shape: tuple) -> tuple:
    if rule is None:
        return tuple(source_shape)
    return tuple(n if a == "kept" else 2 * n for a, n in zip(rule.axes, source_shape))


def runs_in(runs: list, lo: int, hi: int) -> list:
    """The runs clipped to target indices [lo, hi)."""
    out = []
    for r in runs:
        a, b = max(lo, r.target), min(hi, r.target + r.length)
        if a < b:
            out.append(Run(a, r.source + a - r.target, b - a, r.copy))
    return out


@dataclass(frozen=True)
class Piece:
    """One rectangular part of a target region. ``target``: (start, stop) per axis, relative to the
    region; ``source``: (start, stop) per axis of the source tensor, or None for a new block."""
    target: tuple
    source: Optional[tuple]
    scale: float


def width_pieces(rule: Optional[WidthRule], source_shape: tuple, region: tuple) -> list:
    """Split a target ``region`` ((start, stop) per axis, global) into pieces that each read one
    source box. ``rule`` None: the width does not grow (the region reads itself)."""
    if rule is None:
        return [Piece(tuple((0, b - a) for a, b in region), tuple(region), 1.0)]
    per_axis = [runs_in(AXES[a](n), lo, hi) for a, n, (lo, hi) in zip(rule.axes, source_shape, region)]
    pieces = []
    for combo in itertools.product(*per_axis):
        target = tuple((r.target - lo, r.target - lo + r.length) for r, (lo, _) in zip(combo, region))
        copies = [r.copy for r in combo if r.copy is not None]
        if rule.block_diagonal and len(set(copies)) > 1:
            pieces.append(Piece(target, None, 0.0))
            continue
        scale = rule.scale[copies[-1]] if copies else rule.scale[0]
        pieces.append(Piece(target, tuple((r.source, r.source + r.length) for r in combo), scale))
    return pieces


def new_block_values(key: str, kind: str, shape: tuple, region: tuple, piece: Piece, *, noise_std: float,
                     seed: int, layer: int) -> Optional[torch.Tensor]:
    """A new block's values: None (zeros) or, for weights with ``--width-noise``, N(0, std^2) drawn
    for the whole grown tensor (so any layout draws the same numbers) and sliced to the piece."""
    if kind != "param" or noise_std <= 0:
        return None
    full = _noise(shape, noise_std, seed, key, layer)
    return full[tuple(slice(lo + a, lo + b) for (lo, _), (a, b) in zip(region, piece.target))]


def grow_region(key: str, kind: str, rule: Optional[WidthRule], source_shape: tuple, region: tuple,
                read, *, noise_std: float = 0.0, seed: int = 0, layer: int = -1, device=None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The grown tensor's values on ``region`` (computed in fp32). ``read(box)`` returns the source
    box. ``out``: a tensor shaped like the region to write into (no region-sized temporary); by
    default a new fp32 tensor."""
    if out is None:
        out = torch.zeros(tuple(b - a for a, b in region), dtype=torch.float32, device=device)
    shape = grown_shape(rule, source_shape)
    for p in width_pieces(rule, source_shape, region):
        dst = out[tuple(slice(a, b) for a, b in p.target)]
        if p.source is None:
            v = new_block_values(key, kind, shape, region, p, noise_std=noise_std, seed=seed, layer=layer)
            if v is not None:
                dst.copy_(v)  # drawn on the CPU: the same numbers on any device
            else:
                dst.zero_()
            continue
        src = read(p.source).float()
        if p.scale == 1.0:
            dst.copy_(src)
        elif dst.dtype == torch.float32:
            dst.copy_(src).mul_(p.scale)  # the same fp32 product as src * scale, without a temporary
        else:
            dst.copy_(src * p.scale)
    return out


def grow_width(key: str, kind: str, t: torch.Tensor, *, groups: int, swiglu: bool, tied: bool,
               alpha: float, noise_std: float = 0.0, seed: int = 0, layer: int = -1) -> torch.Tensor:
    """Width x2 of one whole global tensor (one layer's, for decoder.layers keys)."""
    del groups  # query groups are contiguous rows: the QKV rows double as a whole
    rule = width_rule(key, kind, t.dim(), swiglu=swiglu, tied=tied, alpha=alpha)
    region = tuple((0, n) for n in grown_shape(rule, tuple(t.shape)))
    return grow_region(key, kind, rule, tuple(t.shape), region,
                       lambda box: t[tuple(slice(a, b) for a, b in box)],
                       noise_std=noise_std, seed=seed, layer=layer)


# depth inits whose new layers are not derived from a source layer: they keep the target model's
# own initialisation (megatron's depth-scaled init: std, and std/sqrt(2 L) on residual outputs)
FRESH_INITS = ("random", "zero")


def fresh_layer_is_zero(key: str, depth_init: str) -> bool:
    """Is this tensor of a fresh layer zero (param and moments)? ``zero``: the residual outputs, so
    the new block is an identity while its other weights are random and it still learns."""
    return depth_init == "zero" and is_residual_output(key)


def identity_init(key: str, t: torch.Tensor) -> torch.Tensor:
    """A new layer made an identity: zero its residual-branch outputs (param and moments alike)."""
    return torch.zeros_like(t) if is_residual_output(key) else t
