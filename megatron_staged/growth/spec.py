"""What a growth does: the depth map, the width factor, and the training-state rules.

A :class:`GrowthSpec` is plain data. ``target_config`` turns it into the grown model's config and
checks it against the target layout *before* anything is built or written, so a bad request fails
with a message a user can act on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_staged.config import Config, validate
from megatron_staged.errors import UserError, require

PLACEMENTS = ("interleave", "stack", "middle")
DEPTH_INITS = ("identity", "copy", "random")

# Published ratios S_pre / S_target (Shen et al. 2022, fitted on GPT-2 curves); depth+width: product.
DEFAULT_RHO = {"depth": 1.4, "width": 1.8}
DEFAULT_REWARMUP_ITERS = 150


@dataclass
class GrowthSpec:
    """One growth. ``depth_map[j]`` is the old layer that new layer ``j`` comes from (None: fresh).

    ``new_layer[j]`` marks the layers that get ``depth_init`` (every copy of an old layer after its
    first occurrence, and fresh layers); the others are plain copies of their old layer.
    """
    old_num_layers: int
    depth_map: list = field(default_factory=list)
    depth_init: str = "identity"
    placement: str = "interleave"
    width_factor: int = 1
    width_split: float = 0.6        # final-norm / output-layer split alpha (0.5: symmetric)
    width_noise: float = 0.0        # std of noise added to new zero blocks (breaks exactness)
    target_tp: Optional[int] = None
    target_pp: Optional[int] = None
    rho: Optional[float] = None
    rewarmup_iters: int = DEFAULT_REWARMUP_ITERS
    seed: int = 1234

    @property
    def new_num_layers(self) -> int:
        return len(self.depth_map) if self.depth_map else self.old_num_layers

    @property
    def grows_depth(self) -> bool:
        return self.new_num_layers != self.old_num_layers or self.depth_map != list(range(self.old_num_layers))

    @property
    def new_layer(self) -> list:
        seen, out = set(), []
        for src in self.depth_map:
            out.append(src is None or src in seen)
            if src is not None:
                seen.add(src)
        return out

    def effective_rho(self) -> float:
        if self.rho is not None:
            return self.rho
        rho = 1.0
        if self.grows_depth:
            rho *= DEFAULT_RHO["depth"]
        if self.width_factor > 1:
            rho *= DEFAULT_RHO["width"]
        return rho

    def to_dict(self) -> dict:
        return asdict(self)


# ---- depth placements ---------------------------------------------------------------------------

def interleave_layers(old: int, new: int) -> list:
    """Old layer i -> new layers 2i, 2i+1 (for new = 2*old); in general j <- floor(j*old/new)."""
    return [j * old // new for j in range(new)]


def stack_layers(old: int, new: int) -> list:
    """The old stack repeated: new layer j <- old layer j mod old (i -> i and old+i for x2)."""
    return [j % old for j in range(new)]


def middle_layers(old: int, new: int) -> list:
    """MIDAS-style: copy the middle block of (new-old) layers and insert the copy after it."""
    k = new - old
    require(0 < k <= old, f"--depth-placement middle can add between 1 and {old} layers to a "
                          f"{old}-layer model, not {k}; use stack or interleave")
    start = (old - k) // 2
    return list(range(start + k)) + list(range(start, start + k)) + list(range(start + k, old))


def depth_map_for(old: int, new: int, placement: str) -> list:
    require(placement in PLACEMENTS, f"--depth-placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    require(new >= old, f"depth growth to {new} layers from {old}: the target must not be shallower")
    if old == 0:
        return [None] * new  # zero-layer model: every layer is fresh
    return {"interleave": interleave_layers, "stack": stack_layers, "middle": middle_layers}[placement](old, new)


def parse_depth_map(text, old: int) -> list:
    """``"0,0,1,1,new"`` -> [0, 0, 1, 1, None]; checks every index refers to an existing layer."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out = []
    for it in items:
        s = str(it).strip()
        if s.lower() in ("new", "none", "-1", "random"):
            out.append(None)
            continue
        try:
            i = int(s)
        except ValueError:
            raise UserError(f"--depth-map entry {s!r} is not a layer index (use integers or 'new')")
        require(0 <= i < old, f"--depth-map refers to layer {i}, but the source model has layers 0..{old - 1}")
        out.append(i)
    require(len(out) > 0, "--depth-map is empty")
    return out


def make_spec(old_cfg: Config, *, num_layers: Optional[int] = None, depth_factor: Optional[float] = None,
              depth_map=None, placement: str = "interleave", depth_init: str = "identity",
              width_factor: int = 1, width_split: float = 0.6, width_noise: float = 0.0,
              target_tp: Optional[int] = None, target_pp: Optional[int] = None, rho: Optional[float] = None,
              rewarmup_iters: int = DEFAULT_REWARMUP_ITERS, seed: Optional[int] = None) -> GrowthSpec:
    """Build and check a GrowthSpec from user-facing options."""
    old = old_cfg.model.num_layers
    require(depth_init in DEPTH_INITS, f"--depth-init {depth_init!r}: choose one of {', '.join(DEPTH_INITS)}")
    require(width_factor in (1, 2), f"--width-factor {width_factor}: only 1 or 2 is supported")
    require(0.0 < width_split < 1.0, f"--width-split {width_split} must be in (0, 1)")
    chosen = sum(x is not None for x in (num_layers, depth_factor, depth_map))
    require(chosen <= 1, "give at most one of --num-layers, --depth-factor and --depth-map")
    if depth_map is not None:
        dmap = parse_depth_map(depth_map, old)
    elif num_layers is not None or depth_factor is not None:
        new = int(num_layers) if num_layers is not None else int(round(old * float(depth_factor)))
        require(old > 0 or num_layers is not None, "a zero-layer model grows with --num-layers N, not a factor")
        dmap = depth_map_for(old, new, placement)
    else:
        dmap = list(range(old))
    if old == 0:
        require(depth_init == "random", "a zero-layer model has no layer to copy: use --depth-init random")
    spec = GrowthSpec(old_num_layers=old, depth_map=dmap, depth_init=depth_init, placement=placement,
                      width_factor=width_factor, width_split=width_split, width_noise=width_noise,
                      target_tp=target_tp, target_pp=target_pp, rho=rho, rewarmup_iters=rewarmup_iters,
                      seed=old_cfg.training.seed if seed is None else seed)
    require(spec.grows_depth or width_factor > 1, "nothing to grow: give --num-layers/--depth-factor/"
                                                 "--depth-map and/or --width-factor 2")
    return spec


def target_config(old_cfg: Config, spec: GrowthSpec, world_size: int) -> Config:
    """The grown model's config at the target layout; raises UserError if it cannot be laid out."""
    from megatron_staged.config import resolve_model

    new = old_cfg.copy()
    resolve_model(old_cfg.model)
    m = new.model
    m.num_layers = spec.new_num_layers
    if spec.width_factor == 2:
        m.hidden_size *= 2
        m.ffn_hidden_size = old_cfg.model.ffn_hidden_size * 2
        m.num_attention_heads *= 2
        m.num_query_groups = old_cfg.model.num_query_groups * 2
        m.kv_channels = old_cfg.model.kv_channels  # head size fixed: doubling it breaks exactness
        if not m.group_query_attention and old_cfg.model.num_query_groups != old_cfg.model.num_attention_heads:
            m.group_query_attention = True
    p = new.parallel
    if spec.target_tp:
        p.tensor_model_parallel_size = spec.target_tp
    if spec.target_pp:
        p.pipeline_model_parallel_size = spec.target_pp
    tp = p.tensor_model_parallel_size
    new.training.global_batch_size = old_cfg.training.global_batch_size
    try:
        validate(new, world_size)
        require(m.padded_vocab_size is None or m.padded_vocab_size % tp == 0,
                f"the padded vocabulary ({m.padded_vocab_size}) cannot be split over TP {tp}")
    except UserError as e:
        raise UserError(f"the grown model ({m.num_layers} layers, hidden {m.hidden_size}, "
                        f"{m.num_attention_heads} heads) does not fit target TP {tp} x PP "
                        f"{p.pipeline_model_parallel_size} on {world_size} processes: {e}")
    return new
