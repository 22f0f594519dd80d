"""``megatron-staged convert``: reshard a checkpoint to another TP/PP layout (and optionally dtype).

    torchrun --nproc-per-node N -m megatron_staged convert --load A --save B \\
        --target-tensor-model-parallel-size T --target-pipeline-model-parallel-size P

N may be any multiple of T x P (DP = N / (T x P)). The whole training state is kept: weights,
Adam moments (and fp32 master weights), optimizer step, LR-scheduler state, consumed samples,
FLOPs so far, stage and loss history. ``--no-optimizer`` writes weights only; ``--dtype bf16|fp32``
casts the stored parameters (the fp32 master weights, when the optimizer is kept, are carried over
exactly) and records it as ``model.bf16`` in the args; ``--[no-]use-distributed-optimizer`` writes
the optimizer state in the other optimizer's form (as a resume that switches does).

There is no separate resharder: the target-layout model and optimizer are built, the checkpoint is
loaded into them by the checkpoint manager (dist_checkpointing reshards the ``fully_reshardable``
format on load) and saved again, exactly as a training run resuming at another layout would.
"""
from __future__ import annotations

import argparse
import time

from megatron_staged.errors import ArgumentParser, UserError

def parse_args(argv):
    p = ArgumentParser(prog="megatron-staged convert",
                                description="Reshard a checkpoint to another TP/PP layout, keeping the training state.")
    p.add_argument("--load", required=True, help="source checkpoint (a --save directory or an iter_XXXXXXX directory)")
    p.add_argument("--save", required=True, help="target checkpoint directory")
    p.add_argument("--target-tensor-model-parallel-size", type=int, default=None, help="default: as saved")
    p.add_argument("--target-pipeline-model-parallel-size", type=int, default=None, help="default: as saved")
    p.add_argument("--target-num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleaved 1F1B of the target (1: none); default: as saved when the PP is, else none")
    p.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B of the target, as layers per virtual stage")
    p.add_argument("--target-decoder-first-pipeline-num-layers", type=int, default=None,
                   help="uneven pipeline of the target: layers on the first stage (0: an even split); "
                        "default: the saved split when the PP is, else an even one")
    p.add_argument("--target-decoder-last-pipeline-num-layers", type=int, default=None,
                   help="uneven pipeline of the target: layers on the last stage (0: an even split)")
    p.add_argument("--no-optimizer", action="store_true", help="write weights only (no optimizer or scheduler state)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="parameter dtype (default: as saved)")
    p.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="write the optimizer state for a run with (or, --no-use-distributed-optimizer, without) "
                        "the distributed optimizer (default: as saved); the moments, fp32 master weights and "
                        "step carry over either way")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint or files already in --save")
    return p.parse_args(argv)


def target_config(common: dict, args, world_size: int):
    """The source's Config with the target layout and dtype; UserError if the layout cannot hold it."""
    from megatron_staged.config import Config, resolve_model, retarget_pipeline_split, validate

    if not common.get("args"):
        raise UserError(f"{args.load}: common.pt holds no args (model config); it was not written by megatron_staged")
    cfg = Config.from_dict(common["args"])
    p, saved = cfg.parallel, common.get("parallel_layout") or {}
    tp = args.target_tensor_model_parallel_size or saved.get("tp", p.tensor_model_parallel_size)
    pp = args.target_pipeline_model_parallel_size or saved.get("pp", p.pipeline_model_parallel_size)
    nvs = getattr(args, "target_num_virtual_stages_per_pipeline_rank", None)
    lpvs = getattr(args, "target_num_layers_per_virtual_pipeline_stage", None)
    if nvs is not None or lpvs is not None:
        p.num_virtual_stages_per_pipeline_rank, p.num_layers_per_virtual_pipeline_stage = nvs, lpvs
    elif pp != saved.get("pp", p.pipeline_model_parallel_size):  # the saved interleaving was for the saved PP
        p.num_virtual_stages_per_pipeline_rank = p.num_layers_per_virtual_pipeline_stage = None
    p.pipeline_model_parallel_size = saved.get("pp", p.pipeline_model_parallel_size)
    retarget_pipeline_split(cfg, pp, getattr(args, "target_decoder_first_pipeline_num_layers", None),
                            getattr(args, "target_decoder_last_pipeline_num_layers", None))
    p.tensor_model_parallel_size = tp
    if args.dtype:
        cfg.model.bf16, cfg.model.fp16 = args.dtype == "bf16", False
    use_dist = getattr(args, "use_distributed_optimizer", None)
    if use_dist is not None:
        p.use_distributed_optimizer = use_dist
        if not use_dist:  # run-time settings of the distributed optimizer only
            p.overlap_param_gather = False
    resolve_model(cfg.model)
    check = cfg.copy()
    # the batch is the training run's business, not the layout's: one that fits (interleaved 1F1B needs
    # a multiple of PP micro-batches)
    check.training.global_batch_size = check.training.micro_batch_size * max(world_size // (tp * pp), 1) * (
        check.parallel.microbatch_group_size_per_virtual_pipeline_stage or pp)
    try:
        validate(check, world_size)
    except UserError as e:  # name this tool's flags, not the trainer's
        msg = str(e).replace("--tensor-model-parallel-size", "--target-tensor-model-parallel-size")
        for flag in ("--num-virtual-stages-per-pipeline-rank", "--num-layers-per-virtual-pipeline-stage",
                     "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"):
            msg = msg.replace(flag, "--target" + flag[1:])
        raise UserError(msg.replace("--pipeline-model-parallel-size", "--target-pipeline-model-parallel-size")) from None
    padded = cfg.model.padded_vocab_size
    if padded is None or padded % tp:
        raise UserError(f"the padded vocabulary {padded} does not split over --target-tensor-model-parallel-size "
                        f"{tp}; choose a TP size that divides it")
    return cfg


def check_target_dir(save: str, source_dir: str, overwrite: bool = False) -> None:
    """Refuse to write over the source, a file, or a non-empty directory (unless --overwrite)."""
    from megatron_staged.checkpoint.manager import check_output_dir

    check_output_dir(save, "--save", sources=(source_dir,), overwrite=overwrite)


def import_scratch_dir(save: str) -> str:
    """``<save>.megatron_lm_import``: where a Megatron-LM checkpoint is first converted at its saved layout
    (removed afterwards). A directory of that name that is not empty is refused rather than deleted:
    it may be the user's. Collective (a barrier), so no rank writes it before every rank has looked."""
    import os

    import torch.distributed as dist

    from megatron_staged.errors import require

    imported = save.rstrip("/") + ".megatron_lm_import"
    free = not os.path.lexists(imported) or (os.path.isdir(imported) and not os.listdir(imported))
    dist.barrier()
    require(free, f"{imported} exists and is not empty: it is where a Megatron-LM checkpoint is first converted "
                  f"(then removed); remove it (an interrupted earlier run leaves one) or choose another --save")
    return imported


def copy_at_saved_layout(ckpt_dir: str, save: str, no_optimizer: bool = False) -> str:
    """A Megatron-LM checkpoint with its dp_reshardable optimizer (readable only at its saved layout and
    dtype), or in its legacy torch format, converted as saved into a scratch directory beside ``save``
    (``no_optimizer``: the weights only); returns that directory."""
    from megatron_staged.runtime.distributed import print_rank0

    from megatron_staged.checkpoint.legacy_torch import is_legacy_dir

    imported = import_scratch_dir(save)
    what = "in its legacy 'torch' format" if is_legacy_dir(ckpt_dir) else "with its dp_reshardable optimizer"
    print_rank0(f"{ckpt_dir} was saved by Megatron-LM {what}; converting it at its saved layout and dtype to "
                f"{imported} first")
    convert(argparse.Namespace(load=ckpt_dir, save=imported, target_tensor_model_parallel_size=None,
                               target_pipeline_model_parallel_size=None, no_optimizer=no_optimizer, dtype=None,
                               use_distributed_optimizer=None, overwrite=True))
    return imported


def convert(args) -> dict:
    for flag, v in (("--target-tensor-model-parallel-size", args.target_tensor_model_parallel_size),
                    ("--target-pipeline-model-parallel-size", args.target_pipeline_model_parallel_size),
                    ("--target-num-virtual-stages-per-pipeline-rank",
                     getattr(args, "target_num_virtual_stages_per_pipeline_rank", None)),
                    ("--target-num-layers-per-virtual-pipeline-stage",
                     getattr(args, "target_num_layers_per_virtual_pipeline_stage", None))):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v} must be positive (>= 1)")
    for flag in ("--target-decoder-first-pipeline-num-layers", "--target-decoder-last-pipeline-num-layers"):
        v = getattr(args, flag[2:].replace("-", "_"), None)
        if v is not None and v < 0:
            raise UserError(f"{flag} {v} must be >= 0 (0: an even split)")

    from megatron_staged.checkpoint.manager import load_checkpoint, load_common, resolve_checkpoint_dir, save_checkpoint

    ckpt_dir, _ = resolve_checkpoint_dir(args.load)
    check_target_dir(args.save, ckpt_dir, args.overwrite)
    common = load_common(ckpt_dir)
    from megatron_staged.builders import build_components
    from megatron_staged.runtime.distributed import init_distributed
    from megatron_staged.training.state import TrainState

    import os

    # checked before anything is built (torchrun's WORLD_SIZE, as init_distributed will see it)
    cfg = target_config(common, args, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed()
    from megatron_staged.tools.grow import needs_import

    def _shape(c, tp, pp):
        p = c.parallel
        return (tp, pp, p.num_virtual_stages_per_pipeline_rank, p.num_layers_per_virtual_pipeline_stage,
                c.model.bf16, c.model.fp16, p.use_distributed_optimizer)

    from megatron_staged.config import Config

    src, saved = Config.from_dict(common["args"]), common.get("parallel_layout") or {}
    as_saved = _shape(src, saved.get("tp", src.parallel.tensor_model_parallel_size),
                      saved.get("pp", src.parallel.pipeline_model_parallel_size))
    target = _shape(cfg, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    if needs_import(common, args.no_optimizer) and target != as_saved:
        # Megatron-LM's dp_reshardable optimizer loads only into the saved layout and dtype (its keys name
        # the DDP buckets' dtypes): convert at those first, as grow does, then from that copy
        imported = copy_at_saved_layout(ckpt_dir, args.save)
        import shutil

        import torch.distributed as dist

        try:
            out = convert(argparse.Namespace(**dict(vars(args), load=imported)))
            dist.barrier()  # every rank has read its shards of the copy
        finally:
            if dist.get_rank() == 0:
                shutil.rmtree(imported, ignore_errors=True)
        return dict(out, source=ckpt_dir, saved_layout=common.get("parallel_layout"))
    source_state = common.get("train_state") or {}
    with_optim = not args.no_optimizer and source_state.get("has_optimizer", True)
    cfg.checkpoint.override_opt_param_scheduler = False  # the saved schedule is carried over as it is
    comps = build_components(cfg, initialize=False, with_optimizer=with_optim,
                             with_scheduler=with_optim and "opt_param_scheduler" in common)
    model, optimizer, scheduler, layout = comps.model, comps.optimizer, comps.scheduler, comps.layout
    state = load_checkpoint(ckpt_dir, model, optimizer, scheduler, load_optimizer=with_optim, load_rng=True,
                           rng_note=False)  # carried at the saved TP/PP; at another, nothing to say
    train_state = TrainState.from_dict(state)
    path = save_checkpoint(args.save, train_state.iteration, model, optimizer, scheduler, train_state.to_dict(),
                           cfg.to_dict(), save_optimizer=with_optim, replace_existing=args.overwrite)
    return {"source": ckpt_dir, "target": path, "layout": layout, "saved_layout": common.get("parallel_layout"),
            "iteration": int(state["iteration"]), "with_optimizer": with_optim,
            "source_had_optimizer": source_state.get("has_optimizer", True),
            "dtype": "bf16" if cfg.model.bf16 else "fp16" if cfg.model.fp16 else "fp32"}


def main(argv) -> int:
    from megatron_staged.runtime.distributed import print_rank0

    args = parse_args(argv)
    t0 = time.time()
    s = convert(args)
    saved = s["saved_layout"] or {}
    note = ""
    if not s["source_had_optimizer"] and not args.no_optimizer:
        note = " (the source holds no optimizer state, so neither does the target)"
    was = (f"TP{saved.get('tp', '?')} PP{saved.get('pp', '?')}" + (f" VP{saved['vp']}" if saved.get("vp") else "")
           + f" DP{saved.get('dp', '?')}")
    print_rank0(f"converted {s['source']} (iteration {s['iteration']}, {was}) -> {s['target']} at {s['layout']}, {s['dtype']}, "
                f"{'with' if s['with_optimizer'] else 'without'} optimizer state{note} in {time.time() - t0:.1f}s")
    return 0
