"""Run growth cases inside one torchrun job (process groups are rebuilt per case).

Each case: load a source checkpoint at a source layout with the trainer, apply one growth stage
through the trainer's in-run path (Trainer.grow: rebuild groups, grow, evaluate before
and after on the same batches), save the grown state, and report the losses as JSON lines.

    torchrun --nproc-per-node W tests/workers/growth_worker.py CASES.json RESULTS.jsonl
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main():
    import torch.distributed as dist

    from megatron_staged.checkpoint.manager import save_checkpoint
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.growth.spec import GrowthRequest
    from megatron_staged.staging.stages import StageRunner
    from megatron_staged.training.trainer import Trainer

    live_stats = []
    inrun_grow = StageRunner.grow

    def grow_and_keep_stats(request, old, *args, **kwargs):
        import gc
        import weakref

        # the growth must let the source model, its grad buffer and optimizer go (memory)
        source = [weakref.ref(old.model[0]), weakref.ref(old.optimizer)]
        out = inrun_grow(request, old, *args, **kwargs)
        gc.collect()
        live_stats.append(dict(out[2], source_freed=all(ref() is None for ref in source)))
        return out

    StageRunner.grow = staticmethod(grow_and_keep_stats)

    cases = json.load(open(sys.argv[1]))
    results = []
    for case in cases:
        args = ["--load", case["source"], "--no-load-rng", *case["data"],
                "--tensor-model-parallel-size", str(case["tp"]), "--pipeline-model-parallel-size", str(case["pp"]),
                "--use-distributed-optimizer", "--micro-batch-size", "2", "--global-batch-size", "8",
                "--eval-iters", "2", "--progress-bar", "off"]
        cfg = config_from_args(_train_parser("worker").parse_args(args))
        trainer = Trainer(cfg)
        entry = trainer.grow(GrowthRequest(**case["stage"]))
        save_checkpoint(case["out"], trainer.iteration, trainer.model, trainer.optimizer, trainer.scheduler,
                        trainer.state.to_dict(), trainer.cfg.to_dict())
        result = {"name": case["name"], "before": entry["eval_loss_before"], "after": entry["eval_loss_after"],
                  "to": entry["to"], "from": entry["from"]}
        if case.get("offline_out"):
            result["live_stats"] = gather_rank_stats(live_stats[-1])
            result["offline_stats"] = grow_offline(case, trainer, entry["to"])
        results.append(result)
        del trainer
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


def gather_rank_stats(stats: dict) -> list:
    """Every rank's growth statistics, with its target TP/PP/DP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    mine = dict(stats, rank=dist.get_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def grow_offline(case: dict, trainer, to: dict) -> list:
    """Grow the case's source checkpoint offline to ``offline_out``, as ``megatron-staged grow`` does,
    to the same target layout ``to`` as the in-run growth."""
    from megatron_staged.checkpoint.manager import load_common, resolve_checkpoint_dir, save_checkpoint
    from megatron_staged.config import Config
    from megatron_staged.growth.apply import grow_from_checkpoint
    from megatron_staged.growth.spec import GrowthRequest, make_spec, target_config
    import torch.distributed as dist

    src_dir, _ = resolve_checkpoint_dir(case["source"])
    common = load_common(src_dir)
    old_cfg = Config.from_dict(common["args"])
    request = GrowthRequest(**dict(case["stage"], target_tensor_model_parallel_size=to["tp"],
                                   target_pipeline_model_parallel_size=to["pp"]))
    spec = make_spec(old_cfg, request)
    new_cfg = target_config(old_cfg, spec, dist.get_world_size())
    trainer.components = None  # one grown model at a time
    comps, state, stats = grow_from_checkpoint(src_dir, spec, old_cfg, common, new_cfg)
    save_checkpoint(case["offline_out"], state.iteration, comps.model, comps.optimizer, comps.scheduler,
                    state.to_dict(), new_cfg.to_dict())
    return gather_rank_stats(stats)


if __name__ == "__main__":
    main()
