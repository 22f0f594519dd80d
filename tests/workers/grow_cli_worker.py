"""Run several ``megatron-staged grow`` commands in one torchrun job (saves the ~7 s import each).

Each case is the argument list of ``megatron-staged grow``; it runs through the CLI's command
table, exactly as ``python -m megatron_staged grow ARGS`` would, minus process start-up.

    torchrun --nproc-per-node W tests/workers/grow_cli_worker.py CASES.json
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main():
    from megatron_staged.cli import COMMANDS

    for argv in json.load(open(sys.argv[1])):
        rc = COMMANDS["grow"](argv)
        if rc not in (0, None):
            raise SystemExit(f"grow {' '.join(argv)} returned {rc}")


if __name__ == "__main__":
    main()
