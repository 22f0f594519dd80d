"""``megatron-staged evaluate --load CKPT``: print the eval loss of a checkpoint.

Data flags as for ``train`` (``--data-path``, ``--mock-data`` or ``--builtin-corpus``); ``--eval-iters`` global batches of the
validation split, from its start, so two checkpoints evaluated alike see the same tokens.
"""
from __future__ import annotations


def main(argv) -> int:
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.preflight import preflight

    cfg = config_from_args(_train_parser("megatron-staged evaluate").parse_args(argv))
    preflight(cfg, "evaluate")  # flags, data and the checkpoint checked before megatron is imported
    from megatron_staged.runtime.distributed import print_rank0
    from megatron_staged.training.trainer import Trainer

    cfg.checkpoint.no_load_rng = True
    cfg.checkpoint.no_load_optim = True  # weights only
    trainer = Trainer(cfg)
    if trainer.valid_ds is None:
        from megatron_staged.errors import UserError

        raise UserError(f"no validation data to evaluate on: --split {cfg.data.split} gives the valid split no "
                        f"share (or give --valid-data-path)")
    loss = trainer.evaluate()
    print_rank0(f"eval loss {loss:.8f} at iteration {trainer.iteration} over {cfg.training.eval_iters} "
                f"batches of {cfg.training.global_batch_size} ({cfg.model.num_layers} layers, "
                f"hidden {cfg.model.hidden_size}, layout {trainer.layout})")
    return 0
