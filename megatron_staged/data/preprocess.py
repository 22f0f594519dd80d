"""Tokenize documents into megatron-core ``.bin/.idx`` indexed datasets.

The logic of Megatron-LM's ``tools/preprocess_data.py``, with the same flag names::

    python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --append-eod --workers 8

writes ``out/corpus_text_document.bin`` and ``.idx`` (one pair per ``--json-keys`` key); pass
``out/corpus_text_document`` to ``--data-path``.

Inputs (``--input`` takes files, globs and directories; directories are searched recursively,
skipping ``.bin``/``.idx`` dataset pairs):

* ``*.jsonl`` / ``*.json``: one JSON object per line; each ``--json-keys`` field is a document;
* any other file: plain text, one document per file, or one per non-blank line with
  ``--text-document-per-line``;
* either compressed (``.gz``, ``.bz2``, ``.xz``): read decompressed, by the name without the suffix.

Bytes that are not UTF-8 become U+FFFD (in JSONL as in plain text). An output prefix whose
``.bin``/``.idx`` already exist is refused unless ``--overwrite`` is given.

Documents that are blank or tokenize to zero tokens are skipped (megatron-core's GPTDataset
loops forever on zero-token documents). Outputs are written under temporary names and renamed
when complete, so an interrupted run leaves no half-written dataset behind.
"""
from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import json
import lzma
import multiprocessing
import os
import re
import sys
import time
from typing import Iterator

from megatron_staged.data.tokenizer import TOKENIZER_TYPES, build_tokenizer
from megatron_staged.errors import UserError, require

JSON_SUFFIXES = (".jsonl", ".json")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _open_text(path: str):
    """``path`` as UTF-8 text (undecodable bytes become U+FFFD; a leading byte-order mark, as Windows
    editors write, is dropped), decompressing .gz/.bz2/.xz."""
    opener = _OPENERS.get(os.path.splitext(path)[1].lower(), open)
    return opener(path, "rt", encoding="utf-8-sig", errors="replace")


def _content_name(path: str) -> str:
    """The name that decides the format: ``docs.jsonl.gz`` is JSONL."""
    stem, ext = os.path.splitext(path)
    return stem if ext.lower() in _OPENERS else path


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Files named by paths, globs or directories (recursive, hidden files skipped), sorted."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                # a dataset written here before (X.bin + X.idx, e.g. --output-prefix inside the input
                # directory) is output, not input
                stems = {n[:-4] for n in names if n.endswith(".bin")} & {n[:-4] for n in names if n.endswith(".idx")}
                files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")
                          and not (n.endswith((".bin", ".idx")) and n[:-4] in stems)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            require(matches, f"--input: {item} is not a file or directory and matches no files")
            files += matches
    require(files, f"--input: no input files found in {inputs}")
    return files


def iter_documents(files: list[str], json_keys: list[str],
                   text_document_per_line: bool = False) -> Iterator[dict[str, str]]:
    """Yield documents as ``{key: text}`` dicts; plain-text files fill the first key only."""
    for path in files:
        try:
            yield from _iter_file(path, json_keys, text_document_per_line)
        except (OSError, EOFError, lzma.LZMAError) as err:  # a truncated or corrupt .gz/.bz2/.xz
            raise UserError(f"--input: cannot read {path} ({type(err).__name__}: {err})") from err


def _iter_file(path: str, json_keys: list[str], text_document_per_line: bool) -> Iterator[dict[str, str]]:
    if _content_name(path).endswith(JSON_SUFFIXES):
        yield from _iter_jsonl(path, json_keys)
        return
    with _open_text(path) as f:
        if text_document_per_line:
            for line in f:
                _require_text(line, path)
                yield {json_keys[0]: line.rstrip("\n")}
        else:
            text = f.read()
            _require_text(text, path)
            yield {json_keys[0]: text}


def _require_text(text: str, path: str) -> None:
    """Text files hold no NUL bytes; a binary file (parquet, arrow, zstd, ...) would be tokenized as
    byte soup without a word."""
    require("\x00" not in text,
            f"--input: {path} holds NUL bytes: it is a binary file, not text; preprocess_data reads JSON lines "
            "(.jsonl/.json), plain text, and either compressed as .gz/.bz2/.xz (for parquet/arrow, export the "
            "text column to JSON lines first)")


def _iter_jsonl(path: str, json_keys: list[str]) -> Iterator[dict[str, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                hint = _ARRAY_HINT if lineno == 1 and line.lstrip().startswith("[") else ""
                raise UserError(f"--input: {path}:{lineno} is not valid JSON ({err}){hint}") from err
            require(isinstance(record, dict), f"--input: {path}:{lineno} is not a JSON object"
                    + (_ARRAY_HINT if lineno == 1 and isinstance(record, list) else ""))
            missing = [k for k in json_keys if k not in record]
            require(not missing,
                    f"--input: {path}:{lineno} has no key(s) {missing} "
                    f"(present: {sorted(record)[:10]}); set --json-keys")
            yield {k: _text_value(record[k], path, lineno, k) for k in json_keys}


_ARRAY_HINT = ("; the file looks like one JSON array, but the input is read as JSON lines (one object per "
               "line, Megatron-LM's format): convert it, e.g. jq -c '.[]' in.json > in.jsonl")

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _text_value(value, path: str, lineno: int, key: str) -> str:
    """A JSONL field as text: a string (lone surrogates such as ``"\\ud800"``, which JSON allows but
    UTF-8 cannot encode, become U+FFFD, as undecodable bytes of plain-text input do); ``null`` is an
    empty document (skipped and counted); any other JSON type is an error rather than its Python
    repr (``5``, ``[..]``) being tokenized as text."""
    if value is None:
        return ""
    kind = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(type(value), "value")
    require(isinstance(value, str), f"--input: {path}:{lineno} has a JSON {kind} under key {key!r}, not a string")
    return _LONE_SURROGATE.sub("\ufffd", value)


# ---- tokenization (runs in worker processes) ----------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_type, tokenizer_model, vocab_size, append_eod, tokenizer_files=None) -> None:
    _WORKER["tokenizer"] = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size, **(tokenizer_files or {}))
    _WORKER["append_eod"] = append_eod


def _encode(doc: dict[str, str]) -> tuple[dict[str, list[int]], int]:
    """Tokenize one document. Returns ({key: ids}, utf-8 bytes read); empty docs map to []."""
    tok = _WORKER["tokenizer"]
    out = {}
    for key, text in doc.items():
        ids = tok.tokenize(text) if text.strip() else []
        if ids and _WORKER["append_eod"]:
            ids.append(tok.eod)
        out[key] = ids
    return out, sum(len(t.encode("utf-8")) for t in doc.values())


def _encoded_stream(docs, workers: int, init_args: tuple):
    """Yield _encode results in input order, using a process pool when workers > 1."""
    if workers <= 1:
        _init_worker(*init_args)
        for doc in docs:
            yield _encode(doc)
        return
    # fork: workers inherit the loaded modules; only this module's light imports are needed.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap(_encode, docs, chunksize=32)


# ---- writing ----------------------------------------------------------------------------------

def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``<output-prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


def preprocess_data(inputs: list[str] | str, output_prefix: str, tokenizer_type: str,
               tokenizer_model: str | None = None, vocab_size: int | None = None,
               json_keys: tuple[str, ...] = ("text",), append_eod: bool = False,
               workers: int = 1, log_interval: int = 1000,
               text_document_per_line: bool = False, log=None, vocab_file: str | None = None,
               merge_file: str | None = None, overwrite: bool = False) -> dict:
    """Tokenize ``inputs`` into one ``.bin/.idx`` indexed dataset per key.

    Returns ``{"prefixes": {key: prefix}, "num_documents": {key: n}, "num_tokens": {key: n},
    "skipped_empty": {key: n}}`` (token counts include EODs).
    """
    json_keys = list(json_keys)
    require(json_keys, "--json-keys needs at least one key")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    files = expand_inputs(inputs)
    existing = [output_prefix_for(output_prefix, k) + sfx for k in json_keys for sfx in (".bin", ".idx")
                if os.path.lexists(output_prefix_for(output_prefix, k) + sfx)]
    require(overwrite or not existing,
            f"--output-prefix {output_prefix}: {existing[0] if existing else ''} already exists; choose another "
            f"prefix, or pass --overwrite to replace it")
    tokenizer_files = {"vocab_file": vocab_file, "merge_file": merge_file}  # GPT2BPETokenizer
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size, **tokenizer_files)  # fail fast
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    init_args = (tokenizer_type, tokenizer_model, vocab_size, append_eod, tokenizer_files)
    docs = iter_documents(files, json_keys, text_document_per_line)
    stream = _encoded_stream(docs, workers, init_args)
    # Import megatron-core (slow: several seconds) after the pool has forked, so the workers
    # start tokenizing meanwhile and do not inherit it.
    first = next(stream, None)
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    final = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in final.items()}
    builders = {k: IndexedDatasetBuilder(tmp[k] + ".bin", dtype=dtype) for k in json_keys}
    stats = {name: dict.fromkeys(json_keys, 0)
             for name in ("num_documents", "num_tokens", "skipped_empty")}
    try:
        _write_all(first, stream, builders, stats, log, log_interval)
        for key in json_keys:
            require(stats["num_documents"][key] > 0,
                    f"--input: no non-empty documents for key {key!r} in {inputs}")
            builders[key].finalize(tmp[key] + ".idx")
            os.replace(tmp[key] + ".bin", final[key] + ".bin")
            os.replace(tmp[key] + ".idx", final[key] + ".idx")
    finally:
        stream.close()  # stops the worker pool if we leave early
        for key in json_keys:
            for suffix in (".bin", ".idx"):
                if os.path.exists(tmp[key] + suffix):
                    os.remove(tmp[key] + suffix)
    for key in json_keys:
        log(f"wrote {final[key]}.bin/.idx: {stats['num_documents'][key]} documents, "
            f"{stats['num_tokens'][key]} tokens, {stats['skipped_empty'][key]} empty skipped")
    return {"prefixes": final, **stats}


def _write_all(first, stream, builders, stats, log, log_interval) -> None:
    """Append every encoded document to its builder; skip zero-token documents."""
    import numpy

    start, nbytes, count = time.time(), 0, 0
    results = stream if first is None else _chain(first, stream)
    for encoded, doc_bytes in results:
        count += 1
        nbytes += doc_bytes
        for key, ids in encoded.items():
            if not ids:
                stats["skipped_empty"][key] += 1
                continue
            builders[key].add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)])
            stats["num_documents"][key] += 1
            stats["num_tokens"][key] += len(ids)
        if log_interval and count % log_interval == 0:
            elapsed = max(time.time() - start, 1e-9)
            # Megatron-LM's progress line, word for word
            log(f"Processed {count} documents ({count / elapsed} docs/s, {nbytes / elapsed / 1024 / 1024} MB/s).")


def _chain(first, rest):
    yield first
    yield from rest


# ---- command line -------------------------------------------------------------------------

def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py", allow_abbrev=False,
        description="Tokenize JSONL or plain-text documents into megatron-core .bin/.idx files.")
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="input files, globs or directories (.jsonl/.json: JSON lines; "
                        "anything else: plain text, one document per file)")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys to extract, one output dataset each (default: text)")
    g.add_argument("--text-document-per-line", action="store_true",
                   help="plain-text inputs: every non-blank line is one document")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model file or local HuggingFace tokenizer directory")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    g.add_argument("--split-sentences", action="store_true",
                   help="Megatron-LM: one sequence per sentence (needs nltk's punkt; refused without it)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="Megatron-LM: with --split-sentences, keep newlines between sentences")
    g.add_argument("--lang", default="english", help="Megatron-LM: --split-sentences language")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes <output-prefix>_<key>_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing <output-prefix>_<key>_document.bin/.idx (refused without it)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    g.add_argument("--log-interval", type=int, default=1000, help="log every N documents")
    g.add_argument("--partitions", type=int, default=1,
                   help="Megatron-LM: input partitions processed in parallel; the output is the same "
                        "documents in the same order, so here --workers alone sets the parallelism")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="Megatron-LM: keep document order across partitions (always kept here)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tools/preprocess_data.py``; bad input exits with status 2."""
    args = get_parser().parse_args(argv)
    try:
        require(args.workers >= 1, "--workers must be >= 1")
        require(args.partitions >= 1, "--partitions must be >= 1")
        require(not args.split_sentences,
                "--split-sentences is not supported: it needs nltk's punkt sentence splitter and writes "
                "<prefix>_<key>_sentence datasets for BERT-style models; GPT pretraining uses whole "
                "documents, so drop it")
        require(not args.keep_newlines, "--keep-newlines only applies with --split-sentences; drop it")
        preprocess_data(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                   args.vocab_size, json_keys=args.json_keys, append_eod=args.append_eod,
                   workers=args.workers, log_interval=args.log_interval,
                   text_document_per_line=args.text_document_per_line, vocab_file=args.vocab_file,
                   merge_file=args.merge_file, overwrite=args.overwrite)
    except UserError as err:
        from megatron_staged.errors import one_line

        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0
