"""Run interleaved-1F1B (virtual pipeline) cases inside one torchrun job (megatron-core imported once).

Each case is a training run with the trainer, in-process (process groups are rebuilt per run, as a
growth does): the flags come from the test (tests/test_virtual_pipeline.py), which compares. Rank 0
writes one JSON line per case: the per-iteration losses, the layout, the number of model chunks on
this rank and the stage history (eval loss before/after each growth). Kind "eval" loads a checkpoint
and evaluates; kind "tool" runs ``convert`` or ``grow`` (argv after the command name).

    torchrun --nproc-per-node 2 tests/workers/vpp_worker.py CASES.json RESULTS.jsonl
"""
import warnings

warnings.filterwarnings("ignore")


def run(flags: list) -> dict:
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    from megatron.core.utils import get_model_config

    t = Trainer(config_from_args(_train_parser("worker").parse_args(flags)))
    start = (str(t.layout), len(t.model), get_model_config(t.model[0]).microbatch_group_size_per_vp_stage,
             rank_layers(t.model))
    summary = t.train()
    out = {"losses": {str(i): loss for i, loss, _ in t.state.loss_history}, "layout": start[0], "chunks": start[1],
           "vp_group": start[2], "rank_layers": start[3], "final_rank_layers": rank_layers(t.model),
           "final_layout": str(t.layout), "final_chunks": len(t.model),
           "stages": [{"before": e["eval_loss_before"], "after": e["eval_loss_after"], "to": e["to"]}
                      for e in summary["stage_history"]]}
    del t
    return out


def rank_layers(model_chunks) -> list:
    """Every rank's global transformer layer indices (rank order), as megatron-core placed them."""
    import torch.distributed as dist

    from megatron_staged.model.builder import global_layers

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, global_layers(model_chunks))
    return out


def evaluate(flags: list) -> dict:
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    t = Trainer(config_from_args(_train_parser("worker").parse_args(flags)))
    out = {"eval": t.evaluate(), "layout": str(t.layout), "chunks": len(t.model), "rank_layers": rank_layers(t.model)}
    del t
    return out


def tool(argv: list) -> dict:
    """``megatron-staged convert|grow ARGV``, in this process (a torchrun job, as a user would launch it)."""
    from megatron_staged.tools import convert, grow

    if argv[0] == "convert":
        convert.convert(convert.parse_args(argv[1:]))
    else:
        grow.main(argv[1:])
    return {}


def main():
    from cases import run_cases

    run_cases(lambda c: {"train": run, "eval": evaluate, "tool": tool}[c.get("kind", "train")](c["flags"]))


if __name__ == "__main__":
    main()
