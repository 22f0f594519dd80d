"""Run many property-test examples inside one torchrun job (megatron-core is imported once).

The examples are drawn by hypothesis in the test process (tests/test_properties.py) and passed
as JSON; each one is run here with the trainer and the convert tool in-process (process groups are
rebuilt per run, as a growth does). Nothing is asserted here: the runs write checkpoints and
metric logs under the case's directory and rank 0 writes what it measured as one JSON line per
case; the test compares.

    torchrun --nproc-per-node 4 tests/workers/property_worker.py CASES.json RESULTS.jsonl

Case kinds:
  convert: train ``iters`` iterations at layout A (saved) and evaluate; convert A -> B and
           B -> A with ``megatron-staged convert``'s code; evaluate the model loaded at B.
  resume:  train ``iters`` iterations straight, saving at iteration ``k`` (``--save-interval k``);
           resume from iteration k in a new trainer at layout A and at layout B (same DP). The
           trainer is rebuilt from scratch (process groups, seeds, model, optimizer, data), so the
           only state carried over is what the checkpoint holds.
"""
import warnings

warnings.filterwarnings("ignore")


def model_flags(c: dict) -> list:
    f = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(c["vocab"]),
         "--model-family", c["family"], "--num-layers", str(c["layers"]),
         "--hidden-size", str(c["heads"] * c["head_dim"]), "--num-attention-heads", str(c["heads"]),
         "--ffn-hidden-size", str(c["ffn"]), "--seq-length", "16", "--micro-batch-size", "1",
         "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-iters", "1", "--progress-bar", "off", "--use-distributed-optimizer",
         "--seed", str(c["seed"]), "--train-iters", str(c["iters"])]
    if c["groups"] != c["heads"]:
        f += ["--group-query-attention", "--num-query-groups", str(c["groups"])]
    return f


def layout_flags(lay) -> list:
    return ["--tensor-model-parallel-size", str(lay[0]), "--pipeline-model-parallel-size", str(lay[1])]


def trainer(args: list):
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    return Trainer(config_from_args(_train_parser("worker").parse_args(args)))


def train(args: list, evaluate: bool = False):
    t = trainer(args)
    t.train()
    loss = t.evaluate() if evaluate else None
    del t
    return loss


def run_convert(c: dict, d: str) -> dict:
    from megatron_staged.tools import convert

    base, a, b = model_flags(c), c["a"], c["b"]
    eval_a = train([*base, *layout_flags(a), "--save", f"{d}/a"], evaluate=True)  # the state saved at the end
    for src, dst, lay in ((f"{d}/a", f"{d}/b", b), (f"{d}/b", f"{d}/aa", a)):
        convert.convert(convert.parse_args(["--load", src, "--save", dst,
                                            "--target-tensor-model-parallel-size", str(lay[0]),
                                            "--target-pipeline-model-parallel-size", str(lay[1])]))
    t = trainer([*base, *layout_flags(b), "--load", f"{d}/b"])
    eval_b = t.evaluate()
    del t
    return {"eval_a": eval_a, "eval_b": eval_b}


def run_resume(c: dict, d: str) -> dict:
    base, a, b, k = model_flags(c), c["a"], c["b"], c["k"]
    train([*base, *layout_flags(a), "--save-interval", str(k), "--save", f"{d}/ckpt",
           "--log-file", f"{d}/straight.jsonl"])
    for name, lay in (("same", a), ("other", b)):
        train([*base, *layout_flags(lay), "--load", f"{d}/ckpt/iter_{k:07d}", "--log-file", f"{d}/resumed_{name}.jsonl"])
    return {}


def main():
    from cases import run_cases

    run_cases(lambda c: (run_convert if c["kind"] == "convert" else run_resume)(c, c["dir"]))


if __name__ == "__main__":
    main()
