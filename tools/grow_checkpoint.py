"""Grow a checkpoint offline: same as ``megatron-staged grow`` (run under torchrun at any world size).

    torchrun --nproc-per-node 4 tools/grow_checkpoint.py --load SRC --save DST --depth-factor 2 \
        --width-factor 2 --target-tensor-model-parallel-size 2 --target-pipeline-model-parallel-size 2
"""
import sys

from megatron_staged.cli import main

if __name__ == "__main__":  # dist_checkpointing.save spawns a process: the guard is required
    sys.exit(main(["grow", *sys.argv[1:]]))
