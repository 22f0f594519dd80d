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
    from megatron_staged.training.trainer import Trainer

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
        results.append({"name": case["name"], "before": entry["eval_loss_before"], "after": entry["eval_loss_after"],
                        "to": entry["to"], "from": entry["from"]})
        del trainer
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
