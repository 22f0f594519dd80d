"""Checks a run's flags against the files they name, before megatron is imported or a process group exists.

``train`` and ``evaluate`` call :func:`preflight` right after parsing: every value in range
(``config.check_values``), the data blend and its ``.bin``/``.idx`` files, the checkpoint to load
(present, intact, data only; Megatron's conventions for a missing one), the directory to save into
(never a different run's checkpoint), and the LR schedule of a resume. Problems are one-line
``UserError``\\ s; notes and warnings are printed by rank 0 only.
"""
from __future__ import annotations

import os
import sys

from megatron_staged.config import Config, check_values, resolve_model
from megatron_staged.errors import UserError

ARCHITECTURE = ("model_family", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                "num_query_groups")


def rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    if rank0():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def preflight(cfg: Config, command: str = "train") -> None:
    check_values(cfg)
    from megatron_staged.runtime.distributed import resolve_backend

    resolve_backend(cfg.parallel.distributed_backend)
    _check_output_file(cfg.logging.log_file, "--log-file")
    _check_output_file(cfg.logging.tensorboard_dir, "--tensorboard-dir", directory=True)
    _check_output_file(cfg.data.data_cache_path, "--data-cache-path", directory=True)
    from megatron_staged.data.validate import check_data_flags

    check_data_flags(cfg.data)
    d = cfg.data
    if command == "train" and (d.valid_data_path or d.test_data_path) and not (
            d.train_data_path or d.data_path or d.mock_data or d.builtin_corpus):
        raise UserError("no training data: --valid/--test-data-path without --train-data-path")
    if command == "evaluate" and cfg.training.eval_iters == 0:
        raise UserError("evaluate needs --eval-iters of at least 1 (0 means no evaluation)")
    common = _check_load(cfg, command)
    _check_layout(cfg, common)
    if command == "train" and common is not None:
        _check_optimizer_switch(cfg, common)
    if command == "train":
        _check_save(cfg, common)
        if common is not None:
            _check_schedule(cfg, common)
            _check_layer_drop(cfg, common)


def _check_output_file(path, flag: str, directory: bool = False) -> None:
    """A file this run appends to (or a ``directory`` it writes into): not a directory (a file), and
    under a directory that exists or can be made."""
    if not path:
        return
    if directory and os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give a directory")
    if not directory and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file path (records are appended to it)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, so the directory for it cannot be made")


def _check_layout(cfg: Config, common) -> None:
    """``config.validate`` and the growth-stage plan on a copy, with the model a --load would adopt and
    torchrun's world size."""
    from megatron_staged.config import validate

    trial = cfg.copy()
    explicit = getattr(cfg, "_explicit", set())
    saved = ((common or {}).get("args") or {}).get("model") or {}
    grown = bool(((common or {}).get("train_state") or {}).get("stage_history"))
    for name, value in saved.items():
        if hasattr(trial.model, name) and (name not in explicit or grown):
            setattr(trial.model, name, value)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(trial, world)
    if trial.staging.stages:
        from megatron_staged.staging.stages import plan_stages
        from megatron_staged.training.state import TrainState

        saved = TrainState()
        if common is not None and not cfg.checkpoint.finetune:
            saved = TrainState.from_dict(dict(common.get("train_state") or {}, iteration=common.get("iteration", 0)))
        plan_stages(trial, trial.staging.stages, world, saved)


def _describe_model(m: dict) -> str:
    return (f"{m.get('model_family')} {m.get('num_layers')} layers x hidden {m.get('hidden_size')}, "
            f"{m.get('num_attention_heads')} heads")


def _check_load(cfg: Config, command: str):
    """Resolve --load (Megatron's conventions); returns the checkpoint's common dict, or None."""
    from megatron_staged.checkpoint.manager import TRACKER, is_checkpoint_root, is_iteration_dir, list_iterations, \
        resolve_checkpoint_dir

    c = cfg.checkpoint
    if not c.load:
        if command == "evaluate":
            raise UserError("evaluate needs --load CKPT")
        return None
    path = c.load
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--load {path} is a file; give a checkpoint directory (the one given to --save, "
                        f"or one iter_XXXXXXX in it)")
    if not os.path.exists(path) or (os.path.isdir(path) and not is_checkpoint_root(path) and not is_iteration_dir(path)
                                    and not list_iterations(path)):
        if command == "evaluate":
            raise UserError(f"--load {path}: no checkpoint there (no {TRACKER})")
        # Megatron-LM: no tracker -> warn and start from random; job scripts pass --load $CKPT --save $CKPT
        # for the first run and every requeue
        warn(f"--load {path}: {'no such directory' if not os.path.exists(path) else f'no {TRACKER}'}; "
             f"starting from scratch (Megatron's convention for a first run)")
        c.load = None
        return None
    if not is_checkpoint_root(path) and not is_iteration_dir(path):
        its = list_iterations(path)
        raise UserError(f"--load {path} holds iter_{its[-1]:07d} (and {len(its) - 1} other iteration(s)) but no "
                        f"{TRACKER}; point --load at one iteration, e.g. {os.path.join(path, f'iter_{its[-1]:07d}')}")
    ckpt_dir, _ = resolve_checkpoint_dir(path, fallback=c.ckpt_fallback_to_intact)
    from megatron_staged.checkpoint.global_tensors import read_common

    common = read_common(ckpt_dir)
    if os.path.abspath(ckpt_dir) != os.path.abspath(path) and c.ckpt_fallback_to_intact:
        c.load = ckpt_dir  # the intact iteration the fallback chose
    return common


def _check_optimizer_switch(cfg: Config, common: dict) -> None:
    """Resuming without the distributed optimizer a checkpoint saved with it in Megatron-LM's flat
    ``dp_reshardable`` form is refused before anything is built (the loader checks it too). Every
    other switch of optimizer kind or precision loads (``checkpoint.manager``: the state is read
    through the other form's model-space keys)."""
    c, args = cfg.checkpoint, common.get("args") or {}
    state = common.get("train_state") or {}
    if c.no_load_optim or c.finetune or not state.get("has_optimizer", True) or not isinstance(args, dict):
        return
    if args.get("parallel", {}).get("use_distributed_optimizer") and not cfg.parallel.use_distributed_optimizer:
        from megatron_staged.checkpoint.manager import _check_switchable

        _check_switchable(common, c.load)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _check_save(cfg: Config, common) -> None:
    """--save never mixes two runs' iterations under one tracker."""
    from megatron_staged.checkpoint.global_tensors import read_common
    from megatron_staged.checkpoint.manager import TRACKER, is_checkpoint_root, iter_dir, list_iterations, read_tracker

    c = cfg.checkpoint
    save = c.save
    if not save:
        return
    if os.path.exists(save) and not os.path.isdir(save):
        raise UserError(f"--save {save} is a file; give a directory")
    its = list_iterations(save)
    if not is_checkpoint_root(save) and not its:
        return
    resuming = c.load is not None and not c.finetune and (
        _same_dir(c.load, save) or _same_dir(os.path.dirname(os.path.abspath(c.load)), save))
    if resuming:
        return
    latest = read_tracker(save) if is_checkpoint_root(save) else its[-1]
    try:
        theirs = (read_common(iter_dir(save, latest)).get("args") or {}).get("model") or {}
    except UserError:
        theirs = {}
    mine = cfg.copy().model
    try:
        resolve_model(mine)
    except UserError:
        pass
    differs = [k for k in ARCHITECTURE if k in theirs and theirs.get(k) != getattr(mine, k)]
    which = f"iteration {latest}" + (f" of a different model ({_describe_model(theirs)}; this run: "
                                     f"{_describe_model(vars(mine))})" if differs else
                                     f" ({_describe_model(theirs)})" if theirs else "")
    why = ("--finetune restarts at iteration 0" if c.finetune and c.load else
           f"this run does not resume it (--load {c.load})" if c.load else "this run starts from scratch")
    raise UserError(f"--save {save} already holds a checkpoint, {which}, and {why}: saving there would mix two "
                    f"runs under one {TRACKER}; resume it with --load {save}, or choose an empty --save directory")


def _check_schedule(cfg: Config, common: dict) -> None:
    """Megatron's rule on resume: the checkpoint's LR schedule unless --override-opt-param-scheduler; say so."""
    c, o, t = cfg.checkpoint, cfg.optim, cfg.training
    if c.override_opt_param_scheduler and c.use_checkpoint_opt_param_scheduler:
        raise UserError("choose one of --override-opt-param-scheduler and --use-checkpoint-opt_param-scheduler")
    saved = common.get("opt_param_scheduler")
    if not saved or c.finetune or c.no_load_optim:
        return
    decay = o.lr_decay_iters or t.train_iters
    ours = {"max_lr": (o.lr, "--lr"), "min_lr": (o.min_lr, "--min-lr"),
            "lr_warmup_steps": (o.lr_warmup_iters, "--lr-warmup-iters"),
            "lr_decay_steps": (decay, "--lr-decay-iters" if o.lr_decay_iters else "--train-iters"),
            "lr_decay_style": (o.lr_decay_style, "--lr-decay-style")}
    diff = [(flag, mine, saved[k]) for k, (mine, flag) in ours.items()
            if k in saved and saved[k] is not None and
            (mine != saved[k] if isinstance(mine, str) else abs(float(mine) - float(saved[k])) > 1e-12 * max(1.0, abs(float(mine))))]
    if not diff:
        return
    listed = ", ".join(f"{flag} gives {mine}, the checkpoint has {theirs}" for flag, mine, theirs in diff)
    if c.override_opt_param_scheduler:
        warn(f"resuming with the flags' LR schedule (--override-opt-param-scheduler): {listed}")
        return
    if c.use_checkpoint_opt_param_scheduler:
        return
    it = int(common.get("iteration") or 0)
    tail = ""
    steps = int(saved.get("lr_decay_steps") or 0)
    # The scheduler's step is not the iteration once a growth moved it (S_pre / rho): it runs behind
    # by ``it - num_steps``, one step per iteration from here, so it reaches ``steps`` that much later.
    now = int(saved.get("num_steps", it) or 0)
    first = it + max(steps - now, 0) + 1
    if t.train_iters >= first and saved.get("lr_decay_style") != "constant":
        which = (f"iteration {first} runs" if first == t.train_iters else
                 f"iterations {first}-{t.train_iters} run")
        tail = f"; its LR decays to min-lr {saved.get('min_lr')} by step {steps}, so {which} at {saved.get('min_lr')}"
    warn(f"resuming with the checkpoint's LR schedule (Megatron's rule; the flags differ: {listed}){tail}; pass "
         f"--override-opt-param-scheduler to use the flags' schedule, or --use-checkpoint-opt_param-scheduler "
         f"to silence this")


def _layer_drop_running(cfg: Config, model: dict, iteration: int) -> bool:
    """Whether ``cfg``'s RaPTr / PLD schedule (over the checkpoint's model) drops layers at ``iteration``."""
    from megatron_staged.subnet.schedule import build_schedule, enabled

    if not enabled(cfg):
        return False
    trial = cfg.copy()
    for name, value in model.items():
        if hasattr(trial.model, name):
            setattr(trial.model, name, value)
    try:
        schedule = build_schedule(trial)
        return schedule is not None and schedule.span > iteration
    except Exception:  # not checkable before validation (e.g. --train-samples): assume it does
        return True


def _check_layer_drop(cfg: Config, common: dict) -> None:
    """A resume whose RaPTr / layer-drop flags differ from the checkpoint's while either schedule still
    drops layers: the flags win (Megatron's rule), and the run no longer continues the saved one; say so."""
    import dataclasses

    from megatron_staged.config import SubnetConfig

    args = common.get("args") or {}
    saved_sub = args.get("subnet")
    if not isinstance(saved_sub, dict) or cfg.checkpoint.finetune:
        return
    it = int(common.get("iteration") or 0)
    if it == 0 or (cfg.training.train_iters is not None and it >= cfg.training.train_iters):
        return  # nothing trained yet (e.g. import-hf), or nothing left to train
    saved = cfg.copy()
    saved.subnet = SubnetConfig()
    for name, value in saved_sub.items():
        if hasattr(saved.subnet, name):
            setattr(saved.subnet, name, value)
    model = args.get("model") or {}
    if not (_layer_drop_running(saved, model, it) or _layer_drop_running(cfg, model, it)):
        return
    diff = []
    for f in dataclasses.fields(SubnetConfig):
        mine, theirs = getattr(cfg.subnet, f.name), getattr(saved.subnet, f.name)
        if mine != theirs:
            flag = ("--no-layer-drop-skip-optimizer-update" if f.name == "layer_drop_skip_optimizer_update"
                    else "--" + f.name.replace("_", "-"))
            diff.append(f"{flag} gives {mine}, the checkpoint has {theirs}")
    if diff:
        warn(f"resuming at iteration {it} with other layer-drop flags than the checkpoint was trained with "
             f"({'; '.join(diff)}): the flags apply from here on, so this run drops other layers than the "
             f"saved run would have; pass the checkpoint's values to continue it")
