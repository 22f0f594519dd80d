"""Train a sentencepiece tokenizer for ``--tokenizer-type SentencePieceTokenizer``.

    python tools/train_tokenizer.py --input data/ --model-prefix out/tok --vocab-size 8000

writes ``out/tok.model`` (pass it as ``--tokenizer-model``) and ``out/tok.vocab``.

``--input`` takes files, globs and directories like ``tools/preprocess_data.py``: ``.jsonl``/
``.json`` files contribute the ``--json-keys`` fields of every record, other files their text.
Training sees one line at a time (sentencepiece's unit), so a newline inside a document is
encoded with a byte-fallback token.

The model has fixed special ids: unk 0, bos 1, eos 2 (the end-of-document token), pad 3, and
``byte_fallback`` so no text is ever unknown. Normalization is the identity and whitespace is kept
as is, so ``detokenize(tokenize(text)) == text`` (source code keeps its indentation).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Iterator

from megatron_staged.data.preprocess import expand_inputs, iter_documents
from megatron_staged.errors import UserError, require

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece_from_texts(texts: Iterable[str], model_prefix: str,
                                   vocab_size: int = 8000, model_type: str = "bpe",
                                   character_coverage: float = 1.0,
                                   max_sentence_length: int = 16384,
                                   input_sentence_size: int = 0, seed: int = 1234,
                                   num_threads: int | None = None, overwrite: bool = False) -> str:
    """Train on the lines of ``texts``; returns the path of the written ``.model`` file.

    ``input_sentence_size`` > 0 samples that many lines (reservoir sampling, seeded).
    ``max_sentence_length`` is in bytes; longer lines are skipped by sentencepiece. An existing
    ``<model_prefix>.model``/``.vocab`` (the tokenizer of datasets already written) is refused
    unless ``overwrite``.
    """
    import sentencepiece

    require(model_type in ("bpe", "unigram"),
            f"--model-type must be bpe or unigram, got {model_type}")
    require(vocab_size >= 300, f"--vocab-size {vocab_size} is too small: byte fallback alone "
            "needs 256 ids plus 4 special ids; use at least 300")
    existing = [model_prefix + sfx for sfx in (".model", ".vocab") if os.path.lexists(model_prefix + sfx)]
    require(overwrite or not existing,
            f"--model-prefix {model_prefix}: {existing[0] if existing else ''} already exists (datasets "
            "tokenized with it would no longer match it); choose another prefix, or pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    sentencepiece.set_random_generator_seed(seed)
    require(input_sentence_size >= 0, f"--input-sentence-size {input_sentence_size} must be >= 0 (0: every line)")
    failures: list[UserError] = []
    lines = _guarded(_lines(texts), failures)
    first = next(lines, None)
    require(first is not None, "--input: the input holds no non-blank text to train on")
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_prepend(first, lines), model_prefix=model_prefix,
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, byte_fallback=True, **SPECIAL_IDS,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            num_threads=num_threads or min(16, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as err:
        if failures:  # bad input found while sentencepiece was reading it: that error, as it is
            raise failures[0] from None
        # e.g. "Vocabulary size is too high (8000). Please set it to a value <= 1234."
        raise UserError(f"sentencepiece training failed: {err}") from err
    return model_prefix + ".model"


def _guarded(lines, failures: list):
    """``lines``, keeping a UserError it raises (sentencepiece's C++ trainer wraps it in a RuntimeError
    with a traceback of its own)."""
    try:
        yield from lines
    except UserError as err:
        failures.append(err)
        raise


def _prepend(first, rest):
    yield first
    yield from rest


def train_sentencepiece(inputs: list[str] | str, model_prefix: str, json_keys=("text",),
                        **kwargs) -> str:
    """Train on files/globs/directories (see module doc); kwargs as in the function above."""
    files = expand_inputs(inputs)
    docs = iter_documents(files, list(json_keys))
    return train_sentencepiece_from_texts(
        (text for doc in docs for text in doc.values()), model_prefix, **kwargs)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_tokenizer.py", allow_abbrev=False,
                                description="Train a sentencepiece tokenizer (eos, pad, byte "
                                            "fallback) for SentencePieceTokenizer.")
    p.add_argument("--input", nargs="+", required=True,
                   help="text/JSONL files, globs or directories")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys to read")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model and .vocab")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <prefix>.model/.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="fraction of characters covered by pieces; the rest use byte fallback")
    p.add_argument("--max-sentence-length", type=int, default=16384,
                   help="longest training line in bytes; longer lines are skipped")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of this many lines (0: all)")
    p.add_argument("--seed", type=int, default=1234)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tools/train_tokenizer.py``; bad input exits with status 2."""
    args = get_parser().parse_args(argv)
    try:
        path = train_sentencepiece(
            args.input, args.model_prefix, json_keys=args.json_keys, vocab_size=args.vocab_size,
            model_type=args.model_type, character_coverage=args.character_coverage,
            max_sentence_length=args.max_sentence_length,
            input_sentence_size=args.input_sentence_size, seed=args.seed, overwrite=args.overwrite)
    except UserError as err:
        from megatron_staged.errors import one_line

        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0
