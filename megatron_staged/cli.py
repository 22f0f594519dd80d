"""``megatron-staged`` command line: train, quickstart, plan, evaluate, grow, convert, inspect, export-hf, import-hf.

Bad input raises :class:`UserError`, printed here as one ``error:`` line with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from megatron_staged.errors import ArgumentParser, UserError

COMMANDS = {}


def command(name):
    def deco(fn):
        COMMANDS[name] = fn
        return fn
    return deco


def _quiet_warnings() -> None:
    # megatron-core warns on import that apex/TE are missing; on CPU that is the expected state.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _train_parser(prog: str) -> argparse.ArgumentParser:
    from megatron_staged.config import add_config_flags

    p = ArgumentParser(prog=prog, description="Pretrain a GPT with megatron-core (Megatron-LM's flags).")
    add_config_flags(p)
    return p


@command("train")
def cmd_train(argv):
    if "--dry-run" in argv:  # validate and print the stages' layouts and memory; build nothing
        from megatron_staged.planning.cli import dry_run
        return dry_run(argv)
    from megatron_staged.config import config_from_args
    from megatron_staged.preflight import preflight

    cfg = config_from_args(_train_parser("megatron-staged train").parse_args(argv))
    preflight(cfg, "train")  # every flag and file checked before megatron is imported
    from megatron_staged.training.trainer import Trainer

    summary = Trainer(cfg).train()
    return summary


def _delegate(name: str, module: str):
    """A command implemented by ``module.main(argv)`` (imported only when used)."""
    def run(argv):
        import importlib

        return importlib.import_module(module).main(argv)
    COMMANDS[name] = run


_delegate("quickstart", "megatron_staged.quickstart")
_delegate("plan", "megatron_staged.planning.cli")
_delegate("evaluate", "megatron_staged.tools.evaluate")
_delegate("grow", "megatron_staged.tools.grow")
_delegate("convert", "megatron_staged.tools.convert")
_delegate("inspect", "megatron_staged.tools.inspect_ckpt")
_delegate("export-hf", "megatron_staged.tools.hf_export")
_delegate("import-hf", "megatron_staged.tools.hf_import")
_delegate("report", "megatron_staged.tools.report")
_delegate("fit-rho", "megatron_staged.tools.fit_rho")




_NONZERO_RANK_ERROR_GRACE_S = 15.0  # how long a rank other than 0 waits for rank 0 to report an error


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_warnings()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-staged {" + ",".join(COMMANDS) + "} [flags]\n"
              "  run `megatron-staged COMMAND --help` for a command's flags")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from megatron_staged.checkpoint.safe_load import untrusted_checkpoint_reads
    from megatron_staged.training.watchdog import launcher_watchdog

    launcher_watchdog()  # under torchrun: stop within seconds if the launcher is killed
    try:
        from megatron_staged import runtime

        # megatron-core fixes, and the CPU backend when there is no CUDA: installed where a command
        # first needs them (init_distributed), after its input checks, and undone afterwards.
        # No checkpoint file may run code, whichever loader reads it.
        with untrusted_checkpoint_reads(), runtime.owned():
            rc = COMMANDS[name](rest)
    except UserError as e:
        from megatron_staged.errors import one_line

        rank = os.environ.get("RANK", "0")
        if rank != "0":
            # Every rank usually hits the same bad input, and rank 0 says so. Exiting at once would let
            # torchrun stop rank 0 (SIGTERM to the others on the first failure) before it printed, and
            # the run would end with no message at all: give rank 0 time to print and exit first (then
            # torchrun ends this process here). Still alive after that, the error is this rank's own.
            import time

            time.sleep(_NONZERO_RANK_ERROR_GRACE_S)
            print(f"error (rank {rank}): {one_line(e)}", file=sys.stderr, flush=True)
            return 2
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        _shutdown()
    return rc if isinstance(rc, int) else 0


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
