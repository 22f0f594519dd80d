"""GPT datasets through megatron-core, plus Megatron's pretraining sampler and data iterator.

``build_gpt_datasets`` validates the user's data before megatron-core sees it: missing
``.bin/.idx`` files, datasets with no tokens, and ``--split`` settings that leave a split with
no tokens all raise :class:`UserError` here, because megatron-core's GPTDataset would otherwise
loop forever building its index (it adds epochs until it has enough tokens).

Samples are dicts of tensors for one sequence of ``seq_length`` tokens: ``tokens``, ``labels``
(int64, [s]), ``loss_mask`` (float32, [s]) and ``position_ids`` (int64, [s]); the data iterator
yields them batched ([b, s]). No ``attention_mask`` is built by default: megatron-core's causal
attention makes its own, and a dense [s, s] mask per sample is large.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Iterator

import numpy
import torch

from megatron_staged.errors import UserError, require

logger = logging.getLogger(__name__)

_SPLIT_NAMES = ("train", "valid", "test")


# ---- validation -------------------------------------------------------------------------------

def _check_prefix(prefix: str, flag: str) -> None:
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        return
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx") and os.path.isfile(stem + ".bin") and os.path.isfile(stem + ".idx"):
        raise UserError(f"{flag}: {prefix} is a file of the dataset; give its prefix, {stem} (as Megatron-LM "
                        "takes it: without .bin/.idx)")
    from megatron_staged.data.validate import output_prefix_hint

    raise UserError(f"{flag}: no indexed dataset at {prefix} (expected {prefix}.bin and {prefix}.idx; "
                    f"build one with tools/preprocess_data.py){output_prefix_hint(prefix)}")


def _sequence_lengths(prefix: str) -> numpy.ndarray:
    """Token count of every sequence in the dataset at ``prefix`` (int32, [num_sequences])."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        reader = _IndexReader(prefix + ".idx", multimodal=False)
        # copy: the reader unmaps the file when it is garbage collected (a view would segfault)
        return numpy.array(reader.sequence_lengths, copy=True)
    except (AssertionError, ValueError, OSError) as err:
        raise UserError(f"--data-path: {prefix}.idx is not a valid megatron-core index "
                        f"({err}); rebuild it with tools/preprocess_data.py") from err


def _check_split_tokens(prefix: str, split_matrix, flag: str, split: str | None) -> None:
    """Every split that draws from ``prefix`` must get at least one token (see module doc).

    Mirrors BlendedMegatronDatasetBuilder: split i takes sequences
    [round(beg_i * n), round(end_i * n)) of the n in the dataset.
    """
    lengths = _sequence_lengths(prefix)
    n = len(lengths)
    for name, bookend in zip(_SPLIT_NAMES, split_matrix):
        if bookend is None:
            continue
        beg, end = int(round(bookend[0] * n)), int(round(bookend[1] * n))
        tokens = int(lengths[beg:end].sum())
        where = f" with --split {split}" if split else ""
        require(tokens > 0,
                f"{flag}: the {name} split of {prefix} holds {end - beg} documents and 0 tokens"
                f"{where} ({n} documents in the dataset); use more documents or a --split "
                f"that gives {name} a larger share (or 0 to disable it)")


def _parse_blend(data_path: list[str] | None, flag: str):
    """Megatron blend list -> (prefixes, weights or None), validated; None if no paths."""
    from megatron.core.datasets.utils import get_blend_from_list

    if not data_path:
        return None
    prefixes, weights = get_blend_from_list([str(p) for p in data_path])
    if weights is not None:
        # megatron-core's BlendedDataset asserts every weight > 0 (a 0 was a traceback, in Megatron-LM too)
        bad = [(w, p) for w, p in zip(weights, prefixes) if not w > 0]
        require(not bad, f"{flag}: blend weights must be positive (megatron-core's BlendedDataset); "
                         + ", ".join(f"{p} has weight {w:g}" for w, p in bad) + ": drop it or give it a weight > 0")
    for prefix in prefixes:
        _check_prefix(prefix, flag)
    return prefixes, weights


def data_fingerprint(prefixes: list[str]) -> str:
    """A short hash identifying the contents of the datasets at ``prefixes``.

    megatron-core keys its cached sample indices by dataset *path*, so re-running the
    preprocessing into the same prefix would silently reuse indices built for the old data.
    We therefore cache under a subdirectory keyed by this hash. It reads file sizes and the
    first and last MiB of each ``.idx`` (not mtimes, so copies on other nodes agree).
    """
    h = hashlib.sha256()
    for prefix in prefixes:
        h.update(os.path.abspath(prefix).encode())
        for suffix in (".bin", ".idx"):
            h.update(str(os.path.getsize(prefix + suffix)).encode())
        with open(prefix + ".idx", "rb") as f:
            h.update(f.read(2**20))
            f.seek(max(0, os.path.getsize(prefix + ".idx") - 2**20))
            h.update(f.read())
    return h.hexdigest()[:16]


# ---- datasets -----------------------------------------------------------------------------------

def build_gpt_datasets(*, data_path: list[str] | None, split: str | None, mock_data: bool,
                       seq_length: int, seed: int, tokenizer, train_samples: int,
                       valid_samples: int, test_samples: int, cache_path: str | None = None,
                       train_data_path: list[str] | None = None,
                       valid_data_path: list[str] | None = None,
                       test_data_path: list[str] | None = None,
                       create_attention_mask: bool = False, eod_mask_loss: bool = False,
                       reset_position_ids: bool = False, require_train: bool = True):
    """Build (train, valid, test) megatron-core GPT datasets; a split without data is None.

    ``data_path`` is Megatron's ``--data-path`` blend: ``[prefix]``, ``[prefix1, prefix2]``
    (weighted by size) or ``[w1, prefix1, w2, prefix2]``, split by ``split`` (e.g. "969,30,1").
    ``train/valid/test_data_path`` instead give one blend per split. ``*_samples`` are sequence
    counts; a dataset smaller than asked for is repeated over epochs (reshuffled each epoch).
    Indices are cached in ``cache_path`` (default: ``index-cache`` next to the first dataset).
    ``eod_mask_loss`` / ``reset_position_ids``: Megatron-LM's flags, done by megatron-core's dataset.
    ``require_train=False`` (``evaluate``) allows a train split without data (returned as None).

    Call on every rank when torch.distributed is initialized: global rank 0 builds the indices
    first, the others wait at a barrier and then load them, so ``cache_path`` must be on a
    filesystem that every rank sees.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    _check_helpers()
    require(seq_length > 0, f"--seq-length must be positive, got {seq_length}")
    require(all(n >= 0 for n in (train_samples, valid_samples, test_samples)),
            "sample counts must be non-negative")
    for attr in ("eod", "vocab_size", "unique_identifiers"):
        require(hasattr(tokenizer, attr), f"tokenizer {tokenizer!r} lacks '{attr}'")

    blend, blend_per_split = None, None
    if mock_data:
        require(not (data_path or train_data_path or valid_data_path or test_data_path),
                "--mock-data cannot be combined with --data-path or --*-data-path")
        split = None
    else:
        per_split = [_parse_blend(p, f"--{n}-data-path") for n, p in
                     zip(_SPLIT_NAMES, (train_data_path, valid_data_path, test_data_path))]
        require(not (data_path and any(per_split)),
                "--data-path cannot be combined with --train/valid/test-data-path")
        if data_path:
            blend = _parse_blend(data_path, "--data-path")
            split = split or "969,30,1"  # Megatron's default --split
            vector = _parse_split(split, parse_and_normalize_split)
            matrix = convert_split_vector_to_split_matrix(vector)
            for prefix in blend[0]:
                _check_split_tokens(prefix, matrix, "--data-path", split)
        else:
            require(any(per_split), "no training data: pass --data-path PREFIX (a .bin/.idx "
                    "pair from tools/preprocess_data.py), --train-data-path, or --mock-data")
            blend_per_split, split = per_split, None
            for name, b in zip(_SPLIT_NAMES, per_split):
                for prefix in (b[0] if b else []):
                    _check_split_tokens(prefix, [(0.0, 1.0)], f"--{name}-data-path", None)

    if not mock_data:
        prefixes = blend[0] if blend else [p for b in blend_per_split if b for p in b[0]]
        base = cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])),
                                          "index-cache")
        cache_path = os.path.join(base, data_fingerprint(prefixes))

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend,
        blend_per_split=blend_per_split, split=split, path_to_cache=cache_path,
        tokenizer=tokenizer, reset_position_ids=reset_position_ids, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=create_attention_mask)
    cls = MockGPTDataset if mock_data else GPTDataset
    sizes = [train_samples, valid_samples, test_samples]
    # Every rank builds its own dataset objects (rank 0 first; the builder barriers in between).
    builder = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config)
    with _rank_zero_if_not_distributed():
        train, valid, test = builder.build()
    if require_train:
        require(train is not None, no_train_data_message(blend, split))
    return train, valid, test


def no_train_data_message(blend, split) -> str:
    return (f"no training data: --split {split} gives the train split no share" if blend else
            "no training data: --valid/--test-data-path without --train-data-path")


@contextlib.contextmanager
def _rank_zero_if_not_distributed():
    """Let ``torch.distributed.get_rank()`` answer 0 while building, in a single process only.

    megatron-core 0.16.1's BlendedDataset (weighted ``--data-path`` blends) calls
    ``torch.distributed.get_rank()`` on an index-cache miss without checking that
    torch.distributed is initialized, which raises ValueError in a single-process run.
    """
    if torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def _parse_split(split: str, parse):
    """Validate Megatron's --split (megatron-core's parser accepts garbage and yields NaNs)."""
    split = str(split).strip().strip("'\"")  # launch scripts often pass --split '99,1,0' with its quotes
    msg = (f"--split {split!r} must be up to three non-negative comma-separated weights with a "
           "positive sum, e.g. 969,30,1")
    try:
        weights = [float(w) for w in str(split).split(",")]
    except ValueError as err:
        raise UserError(msg) from err
    require(1 <= len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0, msg)
    return parse(split)


def _check_helpers() -> None:
    """megatron-core's index builder needs its compiled ``helpers_cpp`` extension.

    The megatron-core wheel ships it prebuilt (``helpers_cpp.cpython-311-x86_64-linux-gnu.so``),
    so nothing is compiled here; a source install without it gets an actionable error.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as err:
        raise UserError("megatron-core's C++ dataset helpers (megatron.core.datasets.helpers_cpp) "
                        "are missing; install the megatron-core wheel (pip install "
                        "megatron-core==0.16.1), which ships them prebuilt") from err


# ---- sampler and iterator --------------------------------------------------------------------

class PretrainingSampler:
    """Megatron's MegatronPretrainingSampler: micro-batches of indices for one DP rank.

    The global sample stream is 0, 1, 2, ... from ``consumed_samples``; it is cut into chunks of
    ``micro_batch_size * data_parallel_size`` samples and DP rank r takes chunk positions
    ``[r*mbs, (r+1)*mbs)``. So a global batch holds the same samples at any DP size, and
    resuming with ``consumed_samples`` continues exactly where a run left off.

    With ``cycle=False`` (Megatron's behaviour) iteration stops before the first incomplete
    chunk. With ``cycle=True`` it never stops: stream position k reads sample ``k % total``
    (still DP-size independent), and a warning is logged once when the data wraps around.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, cycle: bool = False) -> None:
        require(total_samples > 0, f"no samples in the dataset (total_samples={total_samples})")
        require(micro_batch_size > 0,
                f"--micro-batch-size must be positive, got {micro_batch_size}")
        require(data_parallel_size > 0 and 0 <= data_parallel_rank < data_parallel_size,
                f"bad data-parallel rank {data_parallel_rank} of {data_parallel_size}")
        require(consumed_samples >= 0, f"consumed_samples must be >= 0, got {consumed_samples}")
        require(cycle or consumed_samples < total_samples,
                f"no samples left: consumed {consumed_samples} of {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.cycle = cycle
        self._warned = False

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.micro_batch_size * self.data_parallel_size
        start = self.consumed_samples  # first stream position of the current chunk
        while self.cycle or start + chunk <= self.total_samples:
            if start + chunk > self.total_samples and not self._warned:
                self._warned = True
                logger.warning("training data exhausted after %d samples; cycling over the "
                               "dataset again from sample 0", self.total_samples)
            lo = start + self.data_parallel_rank * self.micro_batch_size
            yield [i % self.total_samples for i in range(lo, lo + self.micro_batch_size)]
            start += chunk


def build_data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int, num_workers: int = 0,
                        vocab_size: int | None = None) -> Iterator[dict] | None:
    """An endless iterator over this DP rank's micro-batches of ``dataset`` (None if no dataset).

    Each item is a dict of tensors with a leading micro-batch dimension: ``tokens``, ``labels``,
    ``position_ids`` (int64, [b, s]) and ``loss_mask`` (float32, [b, s]). When the dataset is
    exhausted the iterator cycles over it again (see :class:`PretrainingSampler`, ``cycle``) and
    logs a warning once; size datasets with ``train_samples`` so this does not happen in a
    normal run. With ``vocab_size`` (the model's padded vocabulary) a micro-batch holding a token
    id outside it is a UserError (the data was tokenized with a bigger tokenizer) instead of an
    IndexError (a device-side assert on GPU) inside the embedding.
    """
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank,
                                 dp_size, cycle=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
        persistent_workers=num_workers > 0)
    return iter(loader) if vocab_size is None else _check_token_ids(iter(loader), vocab_size, dataset)


def _check_token_ids(batches: Iterator[dict], vocab_size: int, dataset) -> Iterator[dict]:
    for batch in batches:
        for key in ("tokens", "labels"):
            ids = batch.get(key)
            if ids is not None and ids.numel():
                lo, hi = int(ids.min()), int(ids.max())
                if lo < 0 or hi >= vocab_size:
                    prefix = getattr(getattr(dataset, "dataset", None), "path_prefix", None)
                    where = f" of {prefix}" if prefix else ""
                    raise UserError(
                        f"the data{where} holds token id {hi if hi >= vocab_size else lo}, outside the model's "
                        f"vocabulary of {vocab_size} (padded from the tokenizer's): the dataset was tokenized with "
                        "another tokenizer; pass the --tokenizer-type/--tokenizer-model (or --vocab-size) it was "
                        "preprocessed with, or preprocess it again with this one")
        yield batch
