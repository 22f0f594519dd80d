#!/usr/bin/env python
"""Reshard a checkpoint to another TP/PP layout (and dtype), keeping the optimizer state;
same as ``megatron-staged convert`` (torchrun at any multiple of TP x PP processes).

    torchrun --nproc-per-node 4 tools/convert_checkpoint.py --load SRC --save DST \
        --target-tensor-model-parallel-size 2 --target-pipeline-model-parallel-size 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_staged.cli import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing.save spawns a process: the guard is required
    sys.exit(main(["convert", *sys.argv[1:]]))
