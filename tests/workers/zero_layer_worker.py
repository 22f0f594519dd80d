"""Zero/one-layer scenarios inside one torchrun job (process groups are rebuilt per run).

    torchrun --nproc-per-node 2 tests/workers/zero_layer_worker.py ROOT DATA_FLAGS.json

Writes ``ROOT/results.json`` (rank 0): per run, the per-iteration training losses, the stage
history entries and the final eval loss; the checkpoints stay under ``ROOT`` for the test to
read with the oracle. Runs (TP2 unless said):

- ``zero``: 0 layers at TP2 PP1 for 4 iterations (checkpoint at 3), expanded at iteration 4 to 4
  layers at TP1 PP2 with ``depth_init: zero`` (the growth saves the grown state at 4), to iteration
  6; ``zero_from3`` / ``zero_from4``: the same run resumed from the 0-layer checkpoint at 3 (it
  expands again on the way) and from the grown checkpoint at 4 (at TP1 PP2).
- ``one``: 1 layer at TP2 (checkpoint at 2), expanded at iteration 3 (``at_fraction`` 0.5 of 6) to 4
  layers with ``copy-stack`` (TP2 PP1), to iteration 6; ``one_from2``: resumed from iteration 2.
- ``two``: a 2-layer source (2 iterations); ``copy_<placement>``: that checkpoint grown offline
  (the ``grow`` tool's path) to 6 layers at TP1 PP2 with each copy init.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

MODEL = ["--model-family", "gpt2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "0",
         "--lr-warmup-iters", "1", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "1",
         "--log-interval", "1", "--eval-iters", "2", "--eval-interval", "6", "--progress-bar", "off", "--use-distributed-optimizer"]


def train(root, data, name, layers, iters, *extra, stages=None, layout=(2, 1)):
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    log = os.path.join(root, f"{name}.jsonl")
    args = [*MODEL, *data, "--num-layers", str(layers), "--train-iters", str(iters),
            "--tensor-model-parallel-size", str(layout[0]), "--pipeline-model-parallel-size", str(layout[1]),
            "--log-file", log, *extra]
    cfg = config_from_args(_train_parser("worker").parse_args(args))
    if stages:
        cfg.staging.stages = stages
    trainer = Trainer(cfg)
    trainer.train()
    out = {"final_eval": trainer.evaluate(), "layers": trainer.cfg.model.num_layers,
           "tp": trainer.layout.tp, "pp": trainer.layout.pp, "history": trainer.state.stage_history}
    del trainer
    records = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
    out["losses"] = {r["iteration"]: r["loss"] for r in records if "loss" in r and "iteration" in r}
    return out


def grow_offline(src: str, out: str, request: dict) -> dict:
    import torch.distributed as dist

    from megatron_staged.checkpoint.manager import load_common, resolve_checkpoint_dir, save_checkpoint
    from megatron_staged.config import Config
    from megatron_staged.growth.apply import grow_from_checkpoint
    from megatron_staged.growth.spec import GrowthRequest, make_spec, target_config

    src_dir, _ = resolve_checkpoint_dir(src)
    common = load_common(src_dir)
    old_cfg = Config.from_dict(common["args"])
    spec = make_spec(old_cfg, GrowthRequest(**request))
    new_cfg = target_config(old_cfg, spec, dist.get_world_size())
    comps, state, _ = grow_from_checkpoint(src_dir, spec, old_cfg, common, new_cfg)
    save_checkpoint(out, state.iteration, comps.model, comps.optimizer, comps.scheduler, state.to_dict(),
                    new_cfg.to_dict())
    return {"depth_map": spec.depth_map, "tp": comps.layout.tp, "pp": comps.layout.pp}


def main():
    import time

    import torch.distributed as dist

    root, data = sys.argv[1], json.load(open(sys.argv[2]))
    res, t0 = {}, time.time()

    def timed(name, value):
        res[name] = value
        if dist.get_rank() == 0:
            print(f"zero_layer_worker: {name} done at {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

    ck = os.path.join(root, "zero")
    stage = {"at_iteration": 4, "num_layers": 4, "depth_init": "zero",
             "target_tensor_model_parallel_size": 1, "target_pipeline_model_parallel_size": 2}
    timed("zero", train(root, data, "zero", 0, 6, "--save", ck, "--save-interval", "3", stages=[stage]))
    # from the 0-layer checkpoint at 3 (through the expansion), and from the grown one at 4
    timed("zero_from3", train(root, data, "zero_from3", 0, 6, "--load", os.path.join(ck, "iter_0000003"),
                              stages=[stage]))
    timed("zero_from4", train(root, data, "zero_from4", 0, 6, "--load", os.path.join(ck, "iter_0000004"),
                              stages=[stage], layout=(1, 2)))
    ck = os.path.join(root, "one")
    stage = {"at_fraction": 0.5, "num_layers": 4, "depth_init": "copy-stack"}
    timed("one", train(root, data, "one", 1, 6, "--save", ck, "--save-interval", "2", stages=[stage]))
    timed("one_from2", train(root, data, "one_from2", 1, 6, "--load", os.path.join(ck, "iter_0000002"),
                             stages=[stage]))
    two = os.path.join(root, "two")
    timed("two", train(root, data, "two", 2, 2, "--save", two))
    for init in ("copy-stack", "copy-interleave", "copy-last"):
        timed(init, grow_offline(two, os.path.join(root, init), {
            "num_layers": 6, "depth_init": init, "target_tensor_model_parallel_size": 1,
            "target_pipeline_model_parallel_size": 2}))
    if dist.get_rank() == 0:
        with open(os.path.join(root, "results.json"), "w") as fh:
            json.dump(res, fh)


if __name__ == "__main__":
    main()
