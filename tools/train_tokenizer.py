#!/usr/bin/env python
"""Megatron-style `tools/train_tokenizer.py`; see megatron_staged/data/train_tokenizer.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_staged.data.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
