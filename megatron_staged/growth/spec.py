"""What a growth does: the depth map, the width factor, and the training-state rules.

A :class:`GrowthRequest` is what a user asks for (``grow`` flags, YAML stage keys); ``make_spec``
resolves it against the source model into a :class:`GrowthSpec` (plain data). ``target_config`` turns it into the grown model's config and
checks it against the target layout *before* anything is built or written, so a bad request fails
with a message a user can act on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from megatron_staged.config import Config, validate
from megatron_staged.errors import UserError, require
from megatron_staged.growth.fresh_moments import FRESH_MOMENTS

PLACEMENTS = ("interleave", "stack", "middle", "last")
# Bu (2025)'s expansion inits: copy-<placement> is ``copy`` with that placement; ``zero`` is a fresh
# (random) layer whose residual outputs are zero, so the function is preserved (docs/zero_one_layer.md)
COPY_INITS = {"copy-stack": "stack", "copy-interleave": "interleave", "copy-last": "last"}
EXPANSION_INITS = ("zero",) + tuple(COPY_INITS)
DEPTH_INITS = ("identity", "copy", "random") + EXPANSION_INITS

# Bu (2025): expand at tau = 0.8 T, inside WSD's stable phase; a stage that names no point runs there
DEFAULT_AT_FRACTION = 0.8
# re-warmup after a (non-expansion) growth (Shen et al. 2022: ~150-200 steps)
DEFAULT_REWARMUP_ITERS = 150

# Published ratios S_pre / S_target (Shen et al. 2022, fitted on GPT-2 curves); depth+width: product.
DEFAULT_RHO = {"depth": 1.4, "width": 1.8}


def _opt(default=None, help: str = "", **kw):
    return field(default=default, metadata={"help": help, **kw})


WHEN_KEYS = ("at_iteration", "at_fraction", "at_flops", "trigger")


@dataclass
class GrowthRequest:
    """What a user asks a growth to do: the one definition behind ``megatron-staged grow``'s flags
    (``--depth-factor``) and the YAML stage keys (``staging.stages[n].depth_factor``), defaults
    included. Fields marked ``stage_only`` are YAML stage keys without a ``grow`` flag.
    """
    at_iteration: Optional[int] = _opt(None, "grow at this iteration", stage_only=True)
    at_fraction: Optional[float] = _opt(None, "grow at iteration round(fraction x --train-iters); a stage "
                                              "that names no other point runs at 0.8 (Bu 2025)", stage_only=True)
    at_flops: Optional[float] = _opt(None, "grow at the first iteration whose FLOPs so far reach this", stage_only=True)
    trigger: Optional[str] = _opt(None, "grow when the learning curve's slope says so (slope: Shen et al.'s "
                                        "PRE-GROWTH point)", choices=("slope",), stage_only=True)
    slope_threshold: Optional[float] = _opt(None, "slope above which a slope trigger fires (default: the "
                                                  "paper's, by operator: depth -0.0575, width -0.0475, "
                                                  "depth+width -0.03)", stage_only=True)
    num_layers: Optional[int] = _opt(None, "target depth")
    depth_factor: Optional[float] = _opt(None, "target depth = factor x source depth")
    depth_map: Optional[str] = _opt(None, "explicit old->new layer map, e.g. 0,0,1,1,new")
    depth_placement: str = _opt("interleave", "where copies go: interleave (i -> 2i, 2i+1), stack "
                                "(i -> i, n+i), middle (MIDAS) or last (new layers after the old, copying "
                                "the last)", choices=PLACEMENTS)
    depth_init: str = _opt("identity", "new layers: identity (copies with zeroed residual outputs: exact), copy, "
                                       "random (the target's depth-scaled init), zero (random with zeroed "
                                       "residual outputs: exact), copy-stack / copy-interleave / copy-last (copy "
                                       "with that placement); an expansion keeps the LR (rho 1, no re-warmup)",
                           choices=DEPTH_INITS)
    width_factor: int = _opt(1, "hidden size, heads, query groups and FFN x factor", choices=(1, 2))
    width_split: float = _opt(0.6, "alpha of the final split [alpha*y, (1-alpha)*y]; 0.5 keeps the copies "
                                   "symmetric")
    width_noise: float = _opt(0.0, "noise std on new zero blocks (breaks exactness)")
    target_tensor_model_parallel_size: Optional[int] = _opt(None, "TP of the grown model (default: unchanged)")
    target_pipeline_model_parallel_size: Optional[int] = _opt(None, "PP of the grown model (default: unchanged)")
    target_num_layers_per_virtual_pipeline_stage: Optional[int] = _opt(
        None, "interleaved 1F1B of the grown model: layers per virtual stage (default: the run's virtual "
              "pipeline setting, kept)")
    target_num_virtual_stages_per_pipeline_rank: Optional[int] = _opt(
        None, "interleaved 1F1B of the grown model: virtual stages per pipeline rank, 1 for plain 1F1B "
              "(default: the run's virtual pipeline setting, kept)")
    target_decoder_first_pipeline_num_layers: Optional[int] = _opt(
        None, "uneven pipeline of the grown model: layers on the first stage, 0 for an even split (default: "
              "the run's setting, kept while the PP size is; dropped when it changes)")
    target_decoder_last_pipeline_num_layers: Optional[int] = _opt(
        None, "uneven pipeline of the grown model: layers on the last stage, 0 for an even split (default: "
              "the run's setting, kept while the PP size is; dropped when it changes)")
    rho: Optional[float] = _opt(None, "S_pre / S_target for the LR schedule (default: depth 1.4, width 1.8, "
                                      "both: product; 1 for an expansion)")
    rewarmup_iters: Optional[int] = _opt(None, "re-warmup iterations up to the schedule's LR at S_target "
                                               "(default: 150; 0 for an expansion)")
    fresh_moments: str = _opt("zero", "Adam bias correction of elements whose moments start at zero (new "
                                      "zero blocks, zeroed projections, fresh layers): zero = at the kept "
                                      "step; bias-corrected = counted from the growth (docs/design.md)",
                              choices=FRESH_MOMENTS)
    eval_iters: Optional[int] = _opt(None, "eval batches for the loss check before/after the stage "
                                           "(default: --eval-iters)", stage_only=True)

    @classmethod
    def flag_fields(cls) -> list:
        return [f for f in fields(cls) if not f.metadata.get("stage_only")]

    @classmethod
    def add_flags(cls, parser) -> None:
        """The ``grow`` flags, one per field, with the field's default."""
        from megatron_staged.config import add_field_flag

        group = parser.add_argument_group("growth")
        for f in cls.flag_fields():
            add_field_flag(group, f.name, f, default=f.default)

    @classmethod
    def from_args(cls, ns) -> "GrowthRequest":
        from megatron_staged.config import coerce_field

        return cls(**{f.name: coerce_field(f.name, f, getattr(ns, f.name)) for f in cls.flag_fields()})

    @classmethod
    def from_stage(cls, stage, n: int) -> "GrowthRequest":
        """A YAML stage mapping; errors name the key (``staging.stages[n].key``)."""
        from megatron_staged.config import coerce_field

        if not isinstance(stage, dict):
            raise UserError(f"staging.stages[{n}] must be a mapping, got {stage!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(stage) - set(known))
        if unknown:
            import difflib

            close = [m for k in unknown for m in difflib.get_close_matches(k, list(known), n=1, cutoff=0.8)]
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UserError(f"staging.stages[{n}]: unknown key(s) {unknown}{hint}; allowed: {sorted(known)}")
        r = cls(**{k: coerce_field(k, known[k], v, label=f"staging.stages[{n}].{k}") for k, v in stage.items()})
        when = [k for k in WHEN_KEYS if getattr(r, k) is not None]
        if not when:
            r.at_fraction = DEFAULT_AT_FRACTION
        elif len(when) > 1:
            raise UserError(f"staging.stages[{n}] needs at most one of {', '.join(WHEN_KEYS)} (has {', '.join(when)})")
        if r.at_fraction is not None and not 0.0 < r.at_fraction < 1.0:
            raise UserError(f"staging.stages[{n}].at_fraction {r.at_fraction} must be in (0, 1)")
        if r.slope_threshold is not None and r.trigger is None:
            raise UserError(f"staging.stages[{n}].slope_threshold needs trigger: slope")
        return r

    def key_namer(self, n: Optional[int]):
        """How errors name a field: a ``grow`` flag, or the YAML key of stage ``n``."""
        if n is None:
            return lambda name: "--" + name.replace("_", "-")
        return lambda name: f"staging.stages[{n}].{name}"


@dataclass
class GrowthSpec:
    """A request resolved against its source model. ``depth_map[j]`` is the old layer that new
    layer ``j`` comes from (None: fresh).

    ``new_layer[j]`` marks the layers that get ``depth_init`` (every copy of an old layer after its
    first occurrence, and fresh layers); the others are plain copies of their old layer.
    """
    old_num_layers: int
    depth_map: list
    request: GrowthRequest = field(default_factory=GrowthRequest)
    seed: int = 1234
    stage_index: Optional[int] = None  # the YAML stage it came from (None: the grow tool's flags)

    # the request's options the operators read (copy-<placement> resolved to copy + placement)
    depth_init = property(lambda self: "copy" if self.request.depth_init in COPY_INITS else self.request.depth_init)
    placement = property(lambda self: COPY_INITS.get(self.request.depth_init, self.request.depth_placement))
    width_factor = property(lambda self: self.request.width_factor)
    width_split = property(lambda self: self.request.width_split)
    width_noise = property(lambda self: self.request.width_noise)
    target_tp = property(lambda self: self.request.target_tensor_model_parallel_size)
    target_pp = property(lambda self: self.request.target_pipeline_model_parallel_size)
    rho = property(lambda self: self.request.rho)

    @property
    def is_expansion(self) -> bool:
        """Bu (2025)'s expansion: from a 0- or 1-layer model, or with one of its inits. The LR
        schedule continues unchanged (rho 1, no re-warmup) unless the request says otherwise."""
        return self.grows_depth and (self.old_num_layers <= 1 or self.request.depth_init in EXPANSION_INITS)

    @property
    def rewarmup_iters(self) -> int:
        if self.request.rewarmup_iters is not None:
            return self.request.rewarmup_iters
        return 0 if self.is_expansion else DEFAULT_REWARMUP_ITERS

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
        if self.is_expansion:
            return 1.0
        rho = 1.0
        if self.grows_depth:
            rho *= DEFAULT_RHO["depth"]
        if self.width_factor > 1:
            rho *= DEFAULT_RHO["width"]
        return rho

    def to_dict(self) -> dict:
        return dict(asdict(self.request), old_num_layers=self.old_num_layers, depth_map=list(self.depth_map),
                    seed=self.seed, expansion=self.is_expansion)


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


def last_layers(old: int, new: int) -> list:
    """Old layers in place, each new layer a copy of the last one (Bu's copy-last)."""
    return list(range(old)) + [old - 1] * (new - old)


def depth_map_for(old: int, new: int, placement: str) -> list:
    require(placement in PLACEMENTS, f"--depth-placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    require(new >= old, f"depth growth to {new} layers from {old}: the target must not be shallower")
    if old == 0:
        return [None] * new  # zero-layer model: every layer is fresh
    return {"interleave": interleave_layers, "stack": stack_layers, "middle": middle_layers,
            "last": last_layers}[placement](old, new)


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
    # the grown model computes the source's function only if every layer is kept, in order (copies
    # and fresh layers start as identities); anything else is a different model, not a growth
    firsts = list(dict.fromkeys(i for i in out if i is not None))
    dropped = sorted(set(range(old)) - set(firsts))
    require(not dropped, f"--depth-map leaves out layer{'s' if len(dropped) > 1 else ''} "
                         f"{', '.join(map(str, dropped))}; every source layer must appear (a growth keeps the model's function)")
    wrong = next(((a, b) for a, b in zip(firsts, firsts[1:]) if a > b), None)
    require(wrong is None, f"--depth-map puts layer {wrong and wrong[0]} before layer {wrong and wrong[1]}; the first "
                           f"copy of each source layer must keep the source order (a growth keeps the model's function)")
    return out


def make_spec(old_cfg: Config, request: GrowthRequest, stage_index: Optional[int] = None,
              seed: Optional[int] = None) -> GrowthSpec:
    """Resolve and check a request against the source model; errors name the flag or YAML key."""
    r = request
    name = r.key_namer(stage_index)
    old = old_cfg.model.num_layers
    require(0.0 < r.width_split < 1.0, f"{name('width_split')} {r.width_split} must be in (0, 1)")
    require(r.width_noise >= 0.0, f"{name('width_noise')} {r.width_noise} must be >= 0")
    require(r.rewarmup_iters is None or r.rewarmup_iters >= 0,
            f"{name('rewarmup_iters')} {r.rewarmup_iters} must be >= 0")
    require(r.rho is None or r.rho > 0, f"{name('rho')} {r.rho} must be > 0")
    for key in ("target_tensor_model_parallel_size", "target_pipeline_model_parallel_size",
                "target_num_layers_per_virtual_pipeline_stage", "target_num_virtual_stages_per_pipeline_rank"):
        v = getattr(r, key)
        require(v is None or v >= 1, f"{name(key)} {v} must be >= 1")
    for key in ("target_decoder_first_pipeline_num_layers", "target_decoder_last_pipeline_num_layers"):
        v = getattr(r, key)
        require(v is None or v >= 0, f"{name(key)} {v} must be >= 0 (0: an even split)")
    require(r.target_num_layers_per_virtual_pipeline_stage is None or r.target_num_virtual_stages_per_pipeline_rank is None,
            f"give at most one of {name('target_num_layers_per_virtual_pipeline_stage')} and "
            f"{name('target_num_virtual_stages_per_pipeline_rank')}")
    chosen = [k for k in ("num_layers", "depth_factor", "depth_map") if getattr(r, k) is not None]
    require(len(chosen) <= 1, f"give at most one of {', '.join(name(k) for k in chosen)}")
    try:
        if r.depth_map is not None:
            dmap = parse_depth_map(r.depth_map, old)
        elif r.num_layers is not None or r.depth_factor is not None:
            require(old > 0 or r.num_layers is not None,
                    f"a zero-layer model grows with {name('num_layers')} N, not {name('depth_factor')}")
            require(r.depth_factor is None or r.depth_factor > 0, f"{name('depth_factor')} must be > 0")
            new = int(r.num_layers) if r.num_layers is not None else int(round(old * float(r.depth_factor)))
            dmap = depth_map_for(old, new, COPY_INITS.get(r.depth_init, r.depth_placement))
        else:
            dmap = list(range(old))
    except UserError as e:
        raise UserError(str(e).replace("--depth-map", name("depth_map"))
                        .replace("--depth-placement", name("depth_placement"))) from None
    if old == 0:
        require(r.depth_init in ("random", "zero"),
                f"{name('depth_init')} {r.depth_init}: a zero-layer model has no layer to copy; use random or zero")
    spec = GrowthSpec(old_num_layers=old, depth_map=dmap, request=r,
                      seed=old_cfg.training.seed if seed is None else seed, stage_index=stage_index)
    if not (spec.grows_depth or r.width_factor > 1):
        given = next((f" ({name(k)} {getattr(r, k)} keeps it)" for k in ("num_layers", "depth_factor", "depth_map")
                      if getattr(r, k) is not None), "")
        raise UserError(f"nothing to grow: the source model has {old} layers x hidden {old_cfg.model.hidden_size}"
                        f"{given}; give a larger {name('num_layers')}/{name('depth_factor')}/{name('depth_map')} "
                        f"and/or {name('width_factor')} 2")
    return spec


def target_config(old_cfg: Config, spec: GrowthSpec, world_size: int, offline: bool = False) -> Config:
    """The grown model's config at the target layout; raises UserError if it cannot be laid out.

    ``offline`` (``grow``): the global batch is the resumed run's business, not the checkpoint's (as in
    ``convert``), so the layout is checked with a batch that fits it; the saved config keeps the run's."""
    from megatron_staged.config import resolve_model, retarget_pipeline_split

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
    r = spec.request
    # an uneven split is kept while the PP size is: a depth growth adds its layers to the middle stages
    # (a first/last stage's count usually offsets the embedding or the loss, which do not grow)
    retarget_pipeline_split(new, spec.target_pp or p.pipeline_model_parallel_size,
                            r.target_decoder_first_pipeline_num_layers, r.target_decoder_last_pipeline_num_layers)
    if r.target_num_layers_per_virtual_pipeline_stage or r.target_num_virtual_stages_per_pipeline_rank:
        p.num_layers_per_virtual_pipeline_stage = r.target_num_layers_per_virtual_pipeline_stage
        p.num_virtual_stages_per_pipeline_rank = r.target_num_virtual_stages_per_pipeline_rank
    # else the run's setting is kept: with --num-layers-per-virtual-pipeline-stage a depth growth adds
    # virtual stages, with --num-virtual-stages-per-pipeline-rank it adds layers to each virtual stage
    tp = p.tensor_model_parallel_size
    new.training.global_batch_size = old_cfg.training.global_batch_size
    check = new
    if offline:  # a batch that fits: micro-batch x DP x PP (interleaved 1F1B needs a multiple of PP micro-batches)
        check = new.copy()
        check.training.global_batch_size = (check.training.micro_batch_size *
                                            (p.microbatch_group_size_per_virtual_pipeline_stage or
                                             p.pipeline_model_parallel_size) *
                                            max(world_size // (tp * p.pipeline_model_parallel_size), 1))
    from megatron_staged.config import VOCAB_PADDING_HINT

    try:
        validate(check, world_size)
        require(m.padded_vocab_size is None or m.padded_vocab_size % tp == 0,
                f"the padded vocabulary ({m.padded_vocab_size}) cannot be split over TP {tp}; "
                f"{VOCAB_PADDING_HINT.format(tp=tp)}")
    except UserError as e:
        vp_hint = ""
        name = r.key_namer(spec.stage_index)
        if "virtual" in str(e) or "interleaved" in str(e):
            vp_hint = (f" (set the grown model's interleaving with {name('target_num_virtual_stages_per_pipeline_rank')}"
                       f" or {name('target_num_layers_per_virtual_pipeline_stage')})")
        elif "pipeline stages' layers" in str(e) or "pipeline-split" in str(e) or "divisible by --pipeline" in str(e):
            vp_hint = (f" (set the grown model's split with {name('target_decoder_first_pipeline_num_layers')} / "
                       f"{name('target_decoder_last_pipeline_num_layers')}, 0 for an even split)")
        elif "is not divisible by TP x PP" in str(e) or "is not divisible by --tensor-model-parallel-size" in str(e):
            # the target layout defaults to the source's: name the keys that choose another one
            vp_hint = (f" (or give the grown model a layout that fits with {name('target_tensor_model_parallel_size')}"
                       f" / {name('target_pipeline_model_parallel_size')})")
        raise UserError(f"the grown model ({m.num_layers} layers, hidden {m.hidden_size}, "
                        f"{m.num_attention_heads} heads) does not fit target TP {tp} x PP "
                        f"{p.pipeline_model_parallel_size} on {world_size} processes: {e}{vp_hint}")
    return new
