#!/usr/bin/env python
"""Export a checkpoint as a HuggingFace transformers model; same as ``megatron-staged export-hf``.

    python tools/export_hf.py --load CKPT --out DIR [--vocab-size V] [--verify]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_staged.cli import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing.save spawns a process: the guard is required
    sys.exit(main(["export-hf", *sys.argv[1:]]))
