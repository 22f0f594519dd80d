"""Muon scenarios inside one torchrun job (4 ranks; process groups are rebuilt per scenario).

    torchrun --nproc-per-node 4 tests/workers/muon_worker.py SPEC.json

SPEC.json: {"base": [...train flags...], "out": DIR, "iters": N}. In order, all through the CLI's
own code paths (Trainer, ``convert``, ``grow``), each leaving its logs and checkpoints in DIR:
  resume   --optimizer dist_muon at TP2 DP2: N iterations straight (straight.jsonl); N/2 then
           save to ck_a (first.jsonl); a new Trainer loading ck_a, N/2 more (second.jsonl)
  convert  ck_a -> ck_b at TP1 PP2 (DP2)
  grow     ck_a -> ck_g: depth x2 (stack, identity), width x2, at the source layout
  muon     --optimizer muon (no layer-wise sharding) at TP1 PP2 DP2, loading ck_b: 2 more
           iterations (after.jsonl)
  zero     --num-layers 0 with dist_muon at TP2 DP2: 4 iterations (zero.jsonl)
  live     the same growth in-run: loading ck_a with a stage at iteration N/2, 2 more iterations
           (live.jsonl); and 2 iterations from the offline-grown ck_g (offline.jsonl)
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")


def _trainer(args):
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    cfg = config_from_args(_train_parser("worker").parse_args(args))
    return Trainer(cfg)


def main():
    from megatron_staged.cli import COMMANDS

    spec = json.load(open(sys.argv[1]))
    out, n, base = spec["out"], spec["iters"], spec["base"]
    ck_a, ck_b, ck_g = (os.path.join(out, k) for k in ("ck_a", "ck_b", "ck_g"))
    log = lambda name: ["--log-file", os.path.join(out, name + ".jsonl")]  # noqa: E731

    dist_muon = [*base, "--optimizer", "dist_muon", "--tensor-model-parallel-size", "2", "--train-iters", str(n)]
    _trainer([*dist_muon, *log("straight")]).train()
    _trainer([*dist_muon, *log("first"), "--exit-interval", str(n // 2), "--save", ck_a]).train()
    _trainer([*dist_muon, *log("second"), "--load", ck_a]).train()

    COMMANDS["convert"](["--load", ck_a, "--save", ck_b, "--target-tensor-model-parallel-size", "1",
                         "--target-pipeline-model-parallel-size", "2"])
    COMMANDS["grow"](["--load", ck_a, "--save", ck_g, "--depth-factor", "2", "--depth-placement", "stack",
                      "--depth-init", "identity", "--width-factor", "2"])

    _trainer([*base, "--optimizer", "muon", "--pipeline-model-parallel-size", "2", "--train-iters", str(n // 2 + 2),
              "--load", ck_b, *log("after")]).train()

    # a zero-layer model: nothing for Muon (all Adam), with dist_muon at TP2 DP2
    _trainer([*dist_muon[:-1], "4", "--num-layers", "0", *log("zero")]).train()

    # one file per rank: ranks writing one file while others read it could read it empty (no stage)
    stages = os.path.join(out, f"stages_{os.environ.get('RANK', '0')}.yaml")
    with open(stages, "w") as fh:
        fh.write(f"staging:\n  stages:\n    - {{at_iteration: {n // 2}, depth_factor: 2, depth_placement: stack, "
                 f"depth_init: identity, width_factor: 2}}\n")
    more = [*dist_muon[:-1], str(n // 2 + 2)]
    _trainer([*more, "--config", stages, "--load", ck_a, *log("live")]).train()
    architecture = {"--num-layers", "--hidden-size", "--num-attention-heads"}  # ck_g's own
    grown = [a for i, a in enumerate(more) if a not in architecture and more[i - 1] not in architecture]
    _trainer([*grown, "--load", ck_g, *log("offline")]).train()


if __name__ == "__main__":
    main()
