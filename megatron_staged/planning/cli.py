"""``megatron-staged plan`` and ``megatron-staged train --dry-run``.

``plan`` takes the trainer's flags (or ``--config`` YAML with ``staging.stages``) plus a recipe
(``--stages``) and prints, per stage, what one mode computes. Modes share the model, the recipe and
the stage derivation (``planning/recipe.py``) and add their own flags:

* ``--mode cluster`` (default): layout, memory per GPU and time on ``--gpus`` GPUs.
* ``--mode kaplan``: from a TARGET model (the model flags), batch, budget and a growth recipe
  (``--stages 2xD``, ``2xW``, ``2x2xD``, ``2x2xW``, ``2xDxW``, ...), per stage the parameters, growth
  step, rho, FLOPs and the predicted saving against the target from scratch, from Kaplan's L(N, S)
  (``planning/kaplan.py``).

A mode is one ``PlanMode`` entry in ``MODES``: a flag adder and a ``run(args, cfg)`` that gets the
run's config with the recipe applied.

``train --dry-run --world-size N`` validates a full-size run (flags + YAML + stages) in one process,
without torchrun, process groups, data or a model, and prints each stage at its configured layout.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

from megatron_staged.config import FIELDS, Config, add_config_flags, config_from_args
from megatron_staged.errors import UserError
from megatron_staged.planning.memory import RECOMPUTE_GRANULARITIES, Recompute


@dataclass(frozen=True)
class PlanMode:
    help: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config], int]


def add_hardware_flags(p: argparse.ArgumentParser, check_fit: bool) -> None:
    """``check_fit``: default --gpu-memory-gb to 80 (plan); else check fit only when it is given (dry run)."""
    g = p.add_argument_group("cluster")
    g.add_argument("--gpus", "--world-size", dest="gpus", type=int, default=_env_world_size(),
                   help="number of GPUs (the run's world size; default $WORLD_SIZE)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node (default 8)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0 if check_fit else None,
                   help="memory per GPU in GiB" + (" (default 80)" if check_fit else "; checks fit when given"))
    g.add_argument("--reserved-memory-gb", type=float, default=4.0,
                   help="GiB per GPU kept free for the CUDA context, NCCL and fragmentation (default 4)")
    g.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation to predict time with (0.40)")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense TFLOP/s per GPU (989: H100 SXM bf16)")
    if "recompute_granularity" not in FIELDS:  # until the trainer has these flags, the planner takes them
        g.add_argument("--recompute-granularity", default="none", choices=RECOMPUTE_GRANULARITIES,
                       help="activation recomputation assumed for the memory totals (default none)")
        g.add_argument("--recompute-method", default=None, choices=("uniform", "block"),
                       help="with full: uniform (one kept input per N layers) or block (first N layers per stage)")
        g.add_argument("--recompute-num-layers", type=int, default=None, help="the N of --recompute-method")


def _env_world_size():
    ws = os.environ.get("WORLD_SIZE")
    return int(ws) if ws else None


def hardware(args):
    from megatron_staged.errors import require
    from megatron_staged.planning.cluster import Hardware

    require(args.gpus is None or args.gpus >= 1, f"--gpus/--world-size {args.gpus} must be positive (>= 1)")
    require(args.gpus is not None, "give the number of GPUs: --gpus N (or --world-size N)")
    for flag, v, strict in (("--gpus-per-node", args.gpus_per_node, True), ("--gpu-memory-gb", args.gpu_memory_gb, True),
                            ("--reserved-memory-gb", args.reserved_memory_gb, False),
                            ("--peak-tflops", args.peak_tflops, True)):
        require(v is None or (v > 0 if strict else v >= 0),
                f"{flag} {v} must be {'positive (> 0)' if strict else 'non-negative (>= 0)'}")
    if args.gpu_memory_gb is not None:
        require(args.reserved_memory_gb < args.gpu_memory_gb, f"--reserved-memory-gb {args.reserved_memory_gb:g} "
                                                              f"leaves nothing of --gpu-memory-gb {args.gpu_memory_gb:g}")
    require(0 < args.mfu <= 1, f"--mfu {args.mfu} must be in (0, 1]")
    return Hardware(gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                    reserved_memory_gb=args.reserved_memory_gb, mfu=args.mfu, peak_tflops=args.peak_tflops)


def recompute_settings(args, cfg: Config) -> Recompute:
    """From the trainer's config when it has the recompute flags, else from the planner's own."""
    names = ("recompute_granularity", "recompute_method", "recompute_num_layers")
    if names[0] in FIELDS:
        from megatron_staged.config import get_value

        g, method, n = (get_value(cfg, k) if k in FIELDS else None for k in names)
    else:
        g, method, n = (getattr(args, k) for k in names)
    return Recompute(g or "none", method if g == "full" else None, n if g == "full" else None)


def run_cluster(args, cfg: Config) -> int:
    from megatron_staged.planning.cluster import cluster_report
    from megatron_staged.planning.recipe import plan_stages, schedule_warnings

    hw = hardware(args)
    notes: list = []
    stages, cfg = plan_stages_from_a_valid_layout(cfg, hw, notes)
    text, _ = cluster_report(stages, hw, recompute_settings(args, cfg))
    print(text)
    for line in notes + schedule_warnings(cfg, hw.gpus):
        print(line)
    return 0


def plan_stages_from_a_valid_layout(cfg: Config, hw, notes: list | None = None):
    """(stages, config planned from): the run's stages from its configured layout or, when that layout
    cannot run on ``hw.gpus`` GPUs (e.g. the global batch does not split over the DP it leaves), from
    the first candidate layout that can, with a note: the planner's job is to find one."""
    from megatron_staged.config import resolve_model
    from megatron_staged.errors import UserError
    from megatron_staged.planning.cluster import candidate_layouts, with_layout
    from megatron_staged.planning.recipe import plan_stages, resolve_vocab

    try:
        return plan_stages(cfg, hw.gpus, notes), cfg
    except UserError as e:
        base = cfg.copy()
        resolve_model(base.model)
        resolve_vocab(base)
        p = cfg.parallel
        configured = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        alt = next(iter(candidate_layouts(base, hw)), None)
        if alt is None or alt == configured:
            raise  # (the same layout: the error is not the layout's, e.g. a bad stage key)
        alt_cfg = with_layout(cfg, *alt)
        alt_notes: list = []
        try:
            stages = plan_stages(alt_cfg, hw.gpus, alt_notes)
        except UserError as e2:  # fails at a layout the run can use too: that error is the run's problem
            raise e2 from None
        print(f"note: the configured layout TP{configured[0]} PP{configured[1]} "
              f"cannot run on {hw.gpus} GPUs ({e}); planning from TP{alt[0]} PP{alt[1]}\n")
        if notes is not None:
            notes.extend(alt_notes)
        return stages, alt_cfg


def _run_kaplan(args, cfg: Config) -> int:
    from megatron_staged.planning.kaplan import run_kaplan

    return run_kaplan(args, cfg)


def _kaplan_flags(p: argparse.ArgumentParser) -> None:
    from megatron_staged.planning.kaplan import add_kaplan_flags

    add_kaplan_flags(p)


MODES = {
    "cluster": PlanMode("TP/PP/DP, memory per GPU and time per stage on a cluster",
                        lambda p: add_hardware_flags(p, check_fit=True), run_cluster),
    "kaplan": PlanMode("per-stage parameters, growth step, rho, FLOPs and predicted saving from Kaplan's L(N,S); "
                       "the model flags are the target's", _kaplan_flags, _run_kaplan),
}


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe")
    g.add_argument("--stages", dest="recipe", default=None,  # not `stages`: that is the YAML's config field
                   help="growth recipe replacing staging.stages, e.g. 'depth:2,depth:2' or "
                        "'layers:16@2000,width:2+tp:2@6000' (@iteration, @0.5 or @50%% of the run), or the "
                        "paper's shorthand 2xD, 2xW, 2x2xD, 2xDxW (evenly spaced; --mode kaplan schedules it)")
    g.add_argument("--train-tokens", type=float, default=None,
                   help="tokens to train on; sets --train-iters from the global batch and sequence length")


def run_config(args) -> Config:
    """The run's config from flags/YAML with --train-tokens and --stages applied."""
    from megatron_staged.config import read_data_args_files
    from megatron_staged.errors import require
    from megatron_staged.planning.recipe import parse_recipe, set_train_tokens

    require(args.train_tokens is None or not hasattr(args, "train_iters"),  # (a YAML's train_iters it overrides)
            "give one of --train-tokens and --train-iters")
    cfg = config_from_args(args)
    read_data_args_files(cfg.data)  # so a dry run checks the blend's files too
    t = cfg.training
    if t.train_samples is not None:  # the run's length before the recipe is placed on it (as validate sets it)
        require(args.train_tokens is None, "give one of --train-tokens and --train-samples")
        require(t.global_batch_size, "--train-samples needs --global-batch-size")
        t.train_iters = t.train_samples // t.global_batch_size
        require(t.train_iters > 0, f"--train-samples {t.train_samples} is less than one global batch "
                                   f"(--global-batch-size {t.global_batch_size})")
    set_train_tokens(cfg, args.train_tokens)
    if args.recipe:
        cfg.staging.stages = parse_recipe(args.recipe, cfg.training.train_iters)
    return cfg


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="megatron-staged plan", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="cluster", choices=sorted(MODES),
                   help="; ".join(f"{k}: {v.help}" for k, v in MODES.items()))
    add_recipe_flags(p)
    for mode in MODES.values():
        mode.add_flags(p)
    add_config_flags(p)
    args = p.parse_args(argv)
    return MODES[args.mode].run(args, run_config(args))


def dry_run(argv) -> int:
    """``train --dry-run``: validate the run and print each stage's layout and memory; build nothing."""
    from megatron_staged.planning.cluster import dry_run_report
    from megatron_staged.planning.recipe import plan_stages, schedule_warnings

    p = argparse.ArgumentParser(prog="megatron-staged train --dry-run", allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true", required=True)
    add_recipe_flags(p)
    add_hardware_flags(p, check_fit=False)
    add_config_flags(p)
    args = p.parse_args(argv)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    hw = hardware(args)
    cfg = run_config(args)
    notes: list = []
    stages = plan_stages(cfg, hw.gpus, notes)
    text, plans = dry_run_report(stages, hw, recompute_settings(args, cfg))
    print(f"megatron-staged train --dry-run: the config is valid for {hw.gpus} processes "
          f"(no model built, no process started)\n")
    print(text)
    for line in notes:
        print(line)
    for warning in data_warnings(cfg) + output_warnings(cfg):
        print(f"warning: {warning}")
    for warning in schedule_warnings(cfg, hw.gpus):
        print(warning)
    bad = [pl for pl in plans if pl.fits is False]
    if bad:
        print(f"warning: stage(s) {', '.join(str(pl.stage.index) for pl in bad)} exceed {hw.gpu_memory_gb:g} GiB "
              f"less {hw.reserved_memory_gb:g} reserved per GPU at the configured layout; "
              f"`megatron-staged plan --config ... --gpus {hw.gpus}` suggests one that fits")
    return 0


def data_warnings(cfg: Config) -> list[str]:
    """Inputs the run will read that are not here (data is not opened by a dry run)."""
    d, out = cfg.data, []
    prefixes = [x for x in d.data_path if not _is_number(x)]
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                out.append(f"--data-path {prefix}: {prefix + ext} not found (write it with tools/preprocess_data.py)")
    if d.tokenizer_model and not os.path.exists(d.tokenizer_model):
        out.append(f"--tokenizer-model {d.tokenizer_model} not found")
    return out


def output_warnings(cfg: Config) -> list[str]:
    """What the run would refuse about where it writes (--save, --log-file, --tensorboard-dir,
    --data-cache-path), checked as the run's preflight checks them; warnings, since a dry run may be
    made on another machine than the run."""
    from megatron_staged.preflight import _check_output_file, _check_save

    checks = [lambda: _check_output_file(cfg.logging.log_file, "--log-file"),
              lambda: _check_output_file(cfg.logging.tensorboard_dir, "--tensorboard-dir", directory=True),
              lambda: _check_output_file(cfg.data.data_cache_path, "--data-cache-path", directory=True),
              lambda: _check_save(cfg, None)]
    out = []
    for check in checks:
        try:
            check()
        except UserError as e:
            out.append(f"train would refuse to start: {e}")
    return out


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True
