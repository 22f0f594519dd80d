"""The stages of a run as the trainer will see them: each stage's model, layout and iterations.

Stages come from the config's ``staging.stages`` (the YAML the trainer reads) or from a recipe
string (``--stages``), which is turned into the same stage mappings::

    depth:2,depth:2            two depth doublings, evenly spaced over the run
    depth:2@2000,width:2@6000  at iterations 2000 and 6000
    layers:16@0.25,layers:32@50%   by fraction of --train-iters
    width:2+tp:2               a width doubling onto TP 2 (``+`` joins keys of one stage)
    depth:2@slope              when the slope trigger fires (``trigger: slope``)
    depth:2+at_flops:1e20      at a FLOPs count
    2xD, 2x2xD, 2xW, 2xDxW     the staged-training paper's shorthand (evenly spaced; see planning/kaplan.py)

Short keys: ``depth`` (depth_factor), ``width`` (width_factor), ``layers`` (num_layers), ``tp`` and
``pp`` (the target layout); any other stage key (``depth_init``, ``depth_placement``, ...) is taken
as is. Each stage's model is derived with the growth code's own ``make_spec``/``target_config``, so
the planner, ``train --dry-run`` and the trainer agree on what a stage is.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from megatron_staged.config import Config, pad_vocab_size, resolve_model, validate
from megatron_staged.errors import UserError, require

SHORT_KEYS = {"depth": "depth_factor", "width": "width_factor", "layers": "num_layers",
              "tp": "target_tensor_model_parallel_size", "pp": "target_pipeline_model_parallel_size"}


@dataclass
class PlannedStage:
    index: int
    start_iteration: int
    end_iteration: int
    cfg: Config                  # this stage's model and the layout the trainer will run it at
    growth: Optional[dict]       # the stage mapping that created it (None: the initial model)

    @property
    def iterations(self) -> int:
        return self.end_iteration - self.start_iteration

    @property
    def tokens(self) -> int:
        t = self.cfg.training
        return self.iterations * t.global_batch_size * self.cfg.model.seq_length

    @property
    def when(self) -> str:
        """How the stage's start is known: at_iteration, at_fraction, at_flops, or a slope trigger (assumed)."""
        g = self.growth or {}
        if g.get("trigger"):
            return "slope (assumed)"
        if g.get("at_fraction") is not None or (g and not {"at_iteration", "at_flops"} & set(g)):
            return "at_fraction"  # (a stage that names no point runs at at_fraction 0.8)
        return "at_flops" if g.get("at_flops") is not None else ("at_iteration" if g else "")

    @property
    def label(self) -> str:
        if self.growth is None:
            return "initial"
        inverse = {v: k for k, v in SHORT_KEYS.items()}  # the recipe's short form of the size keys
        return "+".join(f"{inverse[k]}:{v}" for k, v in self.growth.items() if k in inverse)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_recipe(text: str, train_iters: int) -> list[dict]:
    """``"depth:2@2000,width:2"`` -> staging.stages mappings with ``at_iteration`` filled in."""
    from megatron_staged.planning.kaplan import is_growth_recipe, parse_growths

    items = [x.strip() for x in str(text).split(",") if x.strip()]
    require(items, "--stages is empty; e.g. --stages depth:2,depth:2")
    if is_growth_recipe(text):
        growths = parse_growths(text)
        return [dict(g, at_iteration=(n + 1) * train_iters // (len(growths) + 1)) for n, g in enumerate(growths)]
    stages = []
    for n, item in enumerate(items):
        body, _, at = item.partition("@")
        stage = {}
        for part in body.split("+"):
            key, sep, val = part.replace("=", ":").partition(":")
            key = key.strip()
            require(sep and key and val.strip(), f"--stages item {item!r}: write KEY:VALUE[+KEY:VALUE][@ITERATION], "
                                                 f"e.g. depth:2@2000")
            stage[SHORT_KEYS.get(key, key)] = _value(val.strip())
        if at.strip() == "slope":
            stage["trigger"] = "slope"
        elif "at_flops" in stage or "trigger" in stage:
            require(not at, f"--stages item {item!r}: give one of @ITERATION, at_flops and trigger")
        elif at:
            at = at.strip()
            try:
                frac = float(at[:-1]) / 100 if at.endswith("%") else (float(at) if "." in at else None)
                iteration = None if frac is not None else int(float(at))
            except ValueError:
                raise UserError(f"--stages item {item!r}: after @ give an iteration (2000), a fraction of the "
                                f"run (0.25 or 25%) or slope") from None
            if frac is not None:
                require(0 <= frac < 1, f"--stages item {item!r}: a fraction of the run must be in [0, 1)")
                iteration = int(round(frac * train_iters))
            stage["at_iteration"] = iteration
        else:  # evenly spaced: stage n of N starts at (n+1)/(N+1) of the run
            stage["at_iteration"] = (n + 1) * train_iters // (len(items) + 1)
        stages.append(stage)
    return stages


def resolve_vocab(cfg: Config) -> int:
    """Set and return ``padded_vocab_size`` without building data: from the flag, the tokenizer file
    when it exists, or ``--vocab-size`` (standing for the tokenizer's size when its file is not here)."""
    m, d = cfg.model, cfg.data
    if m.padded_vocab_size is not None:
        return m.padded_vocab_size
    vocab = None
    if d.tokenizer_model and os.path.exists(d.tokenizer_model) and d.tokenizer_type != "NullTokenizer":
        from megatron_staged.data.tokenizer import build_tokenizer

        vocab = build_tokenizer(d.tokenizer_type, d.tokenizer_model).vocab_size
    elif m.vocab_size is not None:
        null = d.tokenizer_type == "NullTokenizer" or (d.tokenizer_type is None and d.mock_data)
        vocab = m.vocab_size + (1 if null else 0)  # NullTokenizer adds EOD
    elif d.mock_data:
        vocab = 1024 + 1  # the trainer's mock-data default (data/setup.py) plus EOD
    elif not d.data_path and d.tokenizer_type is None:
        import inspect

        from megatron_staged.data.corpus import prepare_default_corpus

        vocab = inspect.signature(prepare_default_corpus).parameters["vocab_size"].default  # built-in corpus
    require(vocab is not None, f"the vocabulary size is unknown (tokenizer model {d.tokenizer_model!r} not "
                               f"found): give --vocab-size N (the tokenizer's size) or --padded-vocab-size N")
    m.padded_vocab_size = pad_vocab_size(vocab, m.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    return m.padded_vocab_size


def set_train_tokens(cfg: Config, train_tokens: Optional[float]) -> None:
    """``--train-tokens`` sets ``--train-iters`` (ceil(tokens / (global batch x sequence)))."""
    if train_tokens is None:
        return
    t = cfg.training
    require(math.isfinite(float(train_tokens)) and float(train_tokens) > 0,
            f"--train-tokens {train_tokens} must be positive (> 0)")
    require(t.global_batch_size is not None, "--train-tokens needs --global-batch-size")
    t.train_iters = int(math.ceil(float(train_tokens) / (t.global_batch_size * cfg.model.seq_length)))
    if cfg.optim.lr_decay_iters is not None and cfg.optim.lr_decay_iters > t.train_iters:
        cfg.optim.lr_decay_iters = t.train_iters


def plan_stages(cfg: Config, world_size: int, notes: Optional[list] = None) -> list[PlannedStage]:
    """Validate the run's config and derive every stage's config, as the trainer would at ``world_size``.

    The stages are checked by the trainer's own ``staging.stages.plan_stages`` (the check it runs at
    start) and each stage's model comes from the growth code's ``make_spec`` and ``target_config``.
    A stage whose ``at_flops`` lies beyond the run's FLOPs is accepted by the trainer (which ends the
    run without it and says so): it is left out of the plan, with the stages after it, and a line
    saying so is added to ``notes``.
    """
    from megatron_staged.growth.spec import make_spec, target_config
    from megatron_staged.staging.stages import plan_stages as check_stages
    from megatron_staged.training.flops import flops_per_iteration
    from megatron_staged.training.state import TrainState

    cfg = cfg.copy()
    resolve_model(cfg.model)
    resolve_vocab(cfg)
    validate(cfg, world_size)
    require(cfg.model.padded_vocab_size % cfg.parallel.tensor_model_parallel_size == 0,
            f"the padded vocabulary ({cfg.model.padded_vocab_size}) cannot be split over "
            f"TP {cfg.parallel.tensor_model_parallel_size}")
    raw = list(cfg.staging.stages or [])
    pending = check_stages(cfg, raw, world_size, TrainState())
    T = cfg.training.train_iters
    configs, starts, flops_at_start = [cfg], [], 0.0
    for k, s in enumerate(pending):
        prev = configs[-1]
        grown = target_config(prev, make_spec(prev, s.request, s.index), world_size)
        prev_start = starts[-1] if starts else 0
        r = s.request
        if r.at_iteration is not None:
            start = r.at_iteration
        elif r.at_flops is not None:  # the first iteration whose FLOPs so far reach at_flops
            per_iter = flops_per_iteration(prev.model, prev.training.global_batch_size)
            start = prev_start + max(0, math.ceil((r.at_flops - flops_at_start) / per_iter))
        else:  # a slope trigger: unknown before the run; assume halfway to the next fixed iteration
            nxt = next((p.request.at_iteration for p in pending[k + 1:] if p.request.at_iteration is not None), T)
            start = (prev_start + nxt) // 2
        if start >= T and r.at_flops is not None:
            after = (f" or the stages after it (staging.stages[{pending[k + 1].index}:])" if k + 1 < len(pending)
                     else "")
            if notes is not None:
                notes.append(f"note: staging.stages[{s.index}] at_flops {r.at_flops:g} would be reached at iteration "
                             f"{start}, not before --train-iters {T}: the run ends without it{after}")
            break
        require(start < T, f"staging.stages[{s.index}] would start at iteration {start}, not before "
                           f"--train-iters {T}: the stage would never run")
        configs.append(grown)
        start = max(start, prev_start)  # a point already passed: right after the stage before (the trainer's rule)
        flops_at_start += (start - prev_start) * flops_per_iteration(prev.model, prev.training.global_batch_size)
        starts.append(start)
    bounds = [0] + starts + [T]
    return [PlannedStage(k, bounds[k], bounds[k + 1], c, None if k == 0 else dict(raw[pending[k - 1].index]))
            for k, c in enumerate(configs)]


def schedule_warnings(cfg: Config, world_size: int) -> list[str]:
    """The trainer's start-up warnings about where expansions sit in the LR schedule
    (:func:`megatron_staged.staging.stages.expansion_warnings`), for ``plan`` and ``--dry-run``."""
    from megatron_staged.staging.stages import expansion_warnings, schedule_end_warnings
    from megatron_staged.staging.stages import plan_stages as check_stages
    from megatron_staged.training.state import TrainState

    cfg = cfg.copy()
    resolve_model(cfg.model)
    resolve_vocab(cfg)
    validate(cfg, world_size)
    stages = check_stages(cfg, list(cfg.staging.stages or []), world_size, TrainState())
    return expansion_warnings(cfg, stages, world_size) + schedule_end_warnings(cfg, stages, world_size)
