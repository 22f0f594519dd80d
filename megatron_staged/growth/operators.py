"""Growth operators on *global* tensors of one layer (the maths, independent of any layout).

Tensors are named by their megatron-core checkpoint key (``decoder.layers.`` keys refer to one
layer: the leading layer axis is removed). ``kind`` says which training-state tensor it is:
``param`` (model weight or the optimizer's fp32 copy), ``exp_avg`` (Adam m) or ``exp_avg_sq``
(Adam v). Shapes use h = hidden, G = query groups, q = heads per group, d = head size, f = FFN.

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
"""
from __future__ import annotations

import hashlib

import torch

RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")

MOMENT_SCALE = {"param": 1.0, "exp_avg": 0.5, "exp_avg_sq": 0.25}


def layer_suffix(key: str) -> str:
    return key[len("decoder.layers."):] if key.startswith("decoder.layers.") else key


def is_residual_output(key: str) -> bool:
    return layer_suffix(key) in RESIDUAL_OUTPUTS


def _noise(shape, std: float, seed: int, key: str, layer: int) -> torch.Tensor:
    h = hashlib.sha256(f"noise/{seed}/{key}/{layer}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g) * std


def block_diag2(w: torch.Tensor, off: torch.Tensor | None = None) -> torch.Tensor:
    """[[W, off], [off, W]] for W [r, c] -> [2r, 2c]; off defaults to zeros."""
    r, c = w.shape
    out = w.new_zeros(2 * r, 2 * c) if off is None else off.clone()
    out[:r, :c] = w
    out[r:, c:] = w
    return out


def double_qkv_weight(w: torch.Tensor, groups: int, off: torch.Tensor | None = None) -> torch.Tensor:
    """Fused QKV [G*(q+2)*d, h] -> [2G*(q+2)*d, 2h]: groups 0..G-1 read copy 1, G..2G-1 copy 2."""
    rows, h = w.shape
    per = rows // groups
    g = w.view(groups, per, h)
    out = w.new_zeros(2 * groups, per, 2 * h) if off is None else off.view(2 * groups, per, 2 * h).clone()
    out[:groups, :, :h] = g
    out[groups:, :, h:] = g
    return out.view(2 * rows, 2 * h)


def double_swiglu_fc1_weight(w: torch.Tensor, off: torch.Tensor | None = None) -> torch.Tensor:
    """[gate; up] [2f, h] -> [gate'; up'] [4f, 2h], each half doubled block-diagonally."""
    gate, up = w.chunk(2, dim=0)
    offs = (None, None) if off is None else off.chunk(2, dim=0)
    return torch.cat([block_diag2(gate, offs[0]), block_diag2(up, offs[1])], dim=0)


def duplicate(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """[b] -> [b, b] along ``dim``."""
    return torch.cat([v, v], dim=dim)


def split_duplicate(v: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """[v] -> [alpha*v, (1-alpha)*v] along ``dim``: sums back to v."""
    return torch.cat([alpha * v, (1.0 - alpha) * v], dim=dim)


def carries_split(key: str, tied: bool) -> bool:
    """Is this the tensor that takes the alpha split (and the full gradient)?"""
    if tied:
        return key.startswith("decoder.final_layernorm.")
    return key == "output_layer.weight"


def grow_width(key: str, kind: str, t: torch.Tensor, *, groups: int, swiglu: bool, tied: bool,
               alpha: float, noise_std: float = 0.0, seed: int = 0, layer: int = -1) -> torch.Tensor:
    """Width x2 of one global tensor (one layer's, for decoder.layers keys)."""
    sfx = layer_suffix(key)
    is_param = kind == "param"
    if carries_split(key, tied):
        # full gradient reaches each copy: moments duplicated unscaled
        return split_duplicate(t, alpha, dim=-1) if is_param else duplicate(t, dim=-1)
    scale = MOMENT_SCALE[kind]
    if scale != 1.0:
        t = t * scale  # scale the source, not the 4x larger grown tensor
    off = None  # the off-diagonal blocks: zeros, or noise when asked for
    if sfx == "self_attention.linear_qkv.weight":
        if is_param and noise_std > 0:
            off = _noise((2 * t.shape[0], 2 * t.shape[1]), noise_std, seed, key, layer)
        return double_qkv_weight(t, groups, off)
    if sfx in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight") or (
            sfx == "mlp.linear_fc1.weight" and not swiglu):
        if is_param and noise_std > 0:
            off = _noise((2 * t.shape[0], 2 * t.shape[1]), noise_std, seed, key, layer)
        return block_diag2(t, off)
    if sfx == "mlp.linear_fc1.weight":  # SwiGLU
        if is_param and noise_std > 0:
            off = _noise((2 * t.shape[0], 2 * t.shape[1]), noise_std, seed, key, layer)
        return double_swiglu_fc1_weight(t, off)
    if sfx == "mlp.linear_fc1.bias" and swiglu:
        gate, up = t.chunk(2)
        return torch.cat([duplicate(gate), duplicate(up)])
    if sfx == "self_attention.linear_qkv.bias":
        return duplicate(t)  # group-major: groups G..2G-1 repeat groups 0..G-1
    if key in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight", "output_layer.weight"):
        return duplicate(t, dim=1)
    if t.dim() == 1:  # norms' gamma/beta, linear biases
        return duplicate(t)
    raise KeyError(f"no width rule for checkpoint key {key!r} (shape {tuple(t.shape)})")


def identity_init(key: str, t: torch.Tensor) -> torch.Tensor:
    """A new layer made an identity: zero its residual-branch outputs (param and moments alike)."""
    return torch.zeros_like(t) if is_residual_output(key) else t
