"""``megatron-staged grow``: grow a checkpoint offline (any world size under torchrun).

    torchrun --nproc-per-node 4 -m megatron_staged grow --load SRC --save DST --depth-factor 2 \
        --width-factor 2 --target-tensor-model-parallel-size 2 --target-pipeline-model-parallel-size 2

The output is an ordinary checkpoint that ``megatron-staged train --load DST`` resumes.
"""
from __future__ import annotations

import argparse

from megatron_staged.errors import ArgumentParser, UserError


def needs_import(common: dict, no_optimizer: bool) -> bool:
    """A Megatron-LM checkpoint whose distributed optimizer is in its default dp_reshardable form."""
    kind = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    return (common.get("saved_by") == "Megatron-LM" and kind == "dp_reshardable" and not no_optimizer
            and (common.get("train_state") or {}).get("has_optimizer", True))


def main(argv) -> int:
    import os

    import torch.distributed as dist

    from megatron_staged.checkpoint.manager import check_output_dir, load_common, resolve_checkpoint_dir, save_checkpoint
    from megatron_staged.config import Config
    from megatron_staged.growth.apply import grow_from_checkpoint
    from megatron_staged.growth.spec import GrowthRequest, make_spec, target_config
    from megatron_staged.runtime.distributed import init_distributed, print_rank0

    p = ArgumentParser(prog="megatron-staged grow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="source checkpoint (a --save directory or one iter_ dir)")
    p.add_argument("--save", required=True, help="where to write the grown checkpoint")
    p.add_argument("--no-optimizer", action="store_true", help="write weights only")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint or files already in --save")
    p.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="write the grown optimizer state for a run with (or, --no-use-distributed-optimizer, "
                        "without) the distributed optimizer (default: as saved); moments, fp32 masters and step "
                        "are read from either form")
    GrowthRequest.add_flags(p)
    a = p.parse_args(argv)
    src_dir, _ = resolve_checkpoint_dir(a.load)
    named = src_dir  # what the summary names: the user's source, not a scratch copy of it
    check_output_dir(a.save, "--save", sources=(src_dir,), overwrite=a.overwrite)
    common = load_common(src_dir)
    imported = None
    if needs_import(common, a.no_optimizer) or common.get("legacy_torch_format"):
        # Megatron-LM's default optimizer form (dp_reshardable) is readable only at its saved TP/PP, and
        # the growth engine reads torch_dist files (not the legacy torch format's mp_rank_* files):
        # bring the checkpoint over first, as `convert` would, then grow from that copy
        from megatron_staged.tools.convert import copy_at_saved_layout

        init_distributed()
        imported = copy_at_saved_layout(src_dir, a.save, no_optimizer=a.no_optimizer)
        src_dir, _ = resolve_checkpoint_dir(imported)
        common = load_common(src_dir)
    if not common.get("args"):
        raise UserError(f"{src_dir} has no run config (args) in common.pt; was it written by megatron_staged?")
    old_cfg = Config.from_dict(common["args"])
    spec = make_spec(old_cfg, GrowthRequest.from_args(a))
    # validates before anything is built or written (torchrun's WORLD_SIZE, as init_distributed will see it)
    new_cfg = target_config(old_cfg, spec, int(os.environ.get("WORLD_SIZE", "1")), offline=True)
    if a.use_distributed_optimizer is not None:  # the engine reads either form and fills either
        from megatron_staged.config import validate_muon

        new_cfg.parallel.use_distributed_optimizer = a.use_distributed_optimizer
        if not a.use_distributed_optimizer:  # a run-time setting of the distributed optimizer only
            new_cfg.parallel.overlap_param_gather = False
        validate_muon(new_cfg)
    init_distributed()
    comps, state, stats = grow_from_checkpoint(src_dir, spec, old_cfg, common, new_cfg)
    new_cfg.checkpoint.load = None
    save_checkpoint(a.save, state.iteration, comps.model, comps.optimizer, comps.scheduler, state.to_dict(),
                    new_cfg.to_dict(), save_optimizer=not a.no_optimizer, replace_existing=a.overwrite)
    if imported is not None and dist.get_rank() == 0:
        import shutil

        shutil.rmtree(imported, ignore_errors=True)
    e = state.stage_history[-1]
    print_rank0(f"grew {named} -> {a.save} at iteration {state.iteration}: {e['operator']} "
                f"{e['from']['num_layers']}x{e['from']['hidden_size']} -> {e['to']['num_layers']}x{e['to']['hidden_size']}, "
                f"layout TP{e['to']['tp']} PP{e['to']['pp']}{' VP' + str(e['to']['vp']) if e['to'].get('vp') else ''} "
                f"DP{e['to']['dp']}, LR schedule step "
                f"{e['schedule_step_before']} -> {e['schedule_step_after']} (rho {e['rho']:.3g}), "
                f"read {stats['bytes_read'] / 1e6:.1f} MB in {stats['seconds']:.2f}s")
    return 0
