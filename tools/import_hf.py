#!/usr/bin/env python
"""Import a local HuggingFace GPT-2 / Llama model as an iteration-0 checkpoint; same as
``megatron-staged import-hf`` (one process, or torchrun at any world size).

    torchrun --nproc-per-node 2 tools/import_hf.py --hf DIR --save CKPT --target-tensor-model-parallel-size 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_staged.cli import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing.save spawns a process: the guard is required
    sys.exit(main(["import-hf", *sys.argv[1:]]))
