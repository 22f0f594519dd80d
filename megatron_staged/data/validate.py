"""Data flags checked before anything is built (no megatron import): the blend and the files.

``--data-path`` is Megatron's blend list: ``PREFIX``, ``PREFIX1 PREFIX2`` (equal weights) or
``W1 PREFIX1 W2 PREFIX2``. Each prefix names a ``.bin`` / ``.idx`` pair written by
``tools/preprocess_data.py``; the index (megatron-core's ``MMIDIDX`` format: header, version,
dtype code, sequence and document counts, then int32 lengths and int64 byte pointers) must describe
exactly the ``.bin`` beside it, or the run would fail (or read garbage) at its first batch.
"""
from __future__ import annotations

import math
import os
import struct

import numpy

from megatron_staged.errors import UserError, require

INDEX_HEADER = b"MMIDIDX\x00\x00"
ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes


def _number(text: str):
    try:
        v = float(text)
    except ValueError:
        return None
    return v


def parse_data_path(data_path: list, flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """(prefixes, weights or None); UserError for a list that is neither form."""
    items = [str(x) for x in data_path]
    nums = [_number(x) for x in items]
    if nums[0] is None:  # prefixes only
        weights = None
        prefixes = items
        stray = [x for x, n in zip(items, nums) if n is not None and not os.path.exists(x + ".idx")]
        if stray:
            raise UserError(f"{flag}: {stray[0]!r} looks like a weight among prefixes; give either prefixes "
                            f"only or weight-prefix pairs (W1 PREFIX1 W2 PREFIX2)")
    else:
        require(len(items) % 2 == 0, f"{flag}: weight-prefix pairs expected (W1 PREFIX1 W2 PREFIX2), got an odd "
                                     f"number of items ({len(items)})")
        weights, prefixes = [], []
        for w, p, wn in zip(items[0::2], items[1::2], nums[0::2]):
            require(wn is not None, f"{flag}: weight {w!r} (before {p!r}) is not a number")
            require(_number(p) is None or os.path.exists(p + ".idx"),
                    f"{flag}: {p!r} after weight {w} is a number, not a dataset prefix")
            require(math.isfinite(wn) and wn >= 0, f"{flag}: weight {w} of {p} must be a non-negative number")
            weights.append(wn)
            prefixes.append(p)
        require(sum(weights) > 0, f"{flag}: the blend weights sum to 0")
        for wn, p in zip(weights, prefixes):  # megatron-core's BlendedDataset asserts each weight > 0
            require(wn > 0, f"{flag}: blend weights must be positive (megatron-core's BlendedDataset); {p} has "
                            f"weight {wn:g}: drop it or give it a weight > 0")
    return prefixes, weights


def output_prefix_hint(prefix: str) -> str:
    """For ``--data-path out/corpus`` when ``out/corpus_<key>_document.bin/.idx`` exist (the names
    tools/preprocess_data.py writes for ``--output-prefix out/corpus``): a '; did you mean' hint."""
    import glob

    found = sorted(p[:-4] for p in glob.glob(glob.escape(prefix) + "_*_document.idx")
                   if os.path.isfile(p[:-4] + ".bin"))
    if not found:
        return ""
    return (f"; {prefix} looks like the --output-prefix of tools/preprocess_data.py, which wrote "
            f"{', '.join(found[:3])} (<output-prefix>_<key>_document): pass that as the prefix")


def check_indexed_dataset(prefix: str, flag: str = "--data-path") -> int:
    """UserError unless ``prefix.idx`` is a valid index that matches ``prefix.bin``; returns #sequences."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    stem, ext = os.path.splitext(prefix)
    if not (os.path.isfile(idx) and os.path.isfile(bin_)) and ext in (".bin", ".idx") \
            and os.path.isfile(stem + ".bin") and os.path.isfile(stem + ".idx"):
        raise UserError(f"{flag}: {prefix} is a file of the dataset; give its prefix, {stem} (as Megatron-LM "
                        "takes it: without .bin/.idx)")
    require(os.path.isfile(idx) and os.path.isfile(bin_),
            f"{flag}: no indexed dataset at {prefix} (expected {bin_} and {idx}; build one with "
            f"tools/preprocess_data.py){output_prefix_hint(prefix)}")
    size = os.path.getsize(idx)
    with open(idx, "rb") as fh:
        head = fh.read(34)
    bad = f"{flag}: {idx} is not a valid megatron-core index"
    require(len(head) == 34 and head[:9] == INDEX_HEADER, f"{bad} (bad header); rebuild it with tools/preprocess_data.py")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    require(version == 1 and code in ITEMSIZE, f"{bad} (version {version}, dtype code {code})")
    need = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
    require(size >= need, f"{idx} is truncated: {size} bytes, its counts ({n_seq} sequences, {n_doc} documents) "
                          f"need {need}; rebuild it with tools/preprocess_data.py")
    bin_size = os.path.getsize(bin_)
    if n_seq:
        lengths = numpy.fromfile(idx, dtype=numpy.int32, count=n_seq, offset=34)
        pointers = numpy.fromfile(idx, dtype=numpy.int64, count=n_seq, offset=34 + 4 * n_seq)
        require(bool((lengths >= 0).all()) and bool((pointers >= 0).all()), f"{bad} (negative lengths or offsets)")
        end = int(pointers[-1]) + int(lengths[-1]) * ITEMSIZE[code]
    else:
        end = 0
    require(bin_size == end,
            f"{bin_} does not match {idx}: the index describes {end} bytes of tokens, the .bin holds {bin_size} "
            f"(a .bin from another preprocessing run, or a partial copy); rebuild both with tools/preprocess_data.py")
    return n_seq


def check_data_flags(data) -> None:
    """The ``DataConfig`` a run was given: blend syntax and every dataset's files (``--data-path`` and
    the per-split ``--train/valid/test-data-path``, whose datasets are otherwise first read at the
    first evaluation)."""
    if data.mock_data:
        return
    from megatron_staged.config import read_data_args_files

    read_data_args_files(data)  # --data-args-path / --per-split-data-args-path: their blends are checked too
    for flag, blend in (("--data-path", data.data_path), ("--train-data-path", data.train_data_path),
                        ("--valid-data-path", data.valid_data_path), ("--test-data-path", data.test_data_path)):
        if blend:
            prefixes, _ = parse_data_path(blend, flag)
            for p in prefixes:
                check_indexed_dataset(p, flag)
    if data.tokenizer_model and data.tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        require(os.path.exists(data.tokenizer_model),
                f"--tokenizer-model {data.tokenizer_model}: no such file or directory")
