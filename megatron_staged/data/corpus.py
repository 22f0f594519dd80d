"""The built-in corpus: this Python's standard-library source, tokenized and indexed.

It needs no download, so quickstarts, tests and benchmarks train on real text anywhere. Each
``.py`` file of the stdlib (test suites and site-packages excluded) is one document. The files are
listed in sorted order, then shuffled with a fixed seed, then taken in that order until
``max_bytes``; the result is deterministic for a given Python installation.

Why shuffled: Megatron splits a dataset by document index (``--split 95,5,0``: the first 95% of
documents train, the last 5% validate). Written in sorted file order, validation would be the
alphabetically last modules (``xml``, ``zipfile``, ...), another distribution than training, and a
``max_bytes`` cut would keep only the first packages. Shuffled, both the cut and the validation
split are a uniform random sample of the stdlib's modules. CPython 3.11's stdlib holds about
12 MB of such source (~4M tokens at vocab 4096); the default 8 MB keeps the quickstart's build fast,
``--builtin-corpus-max-bytes`` (or ``max_bytes``) takes more.

The build is cached under ``cache_dir/stdlib-<key>/`` with ``key`` hashing vocab_size, max_bytes
and the Python version, so later calls return at once. It is built in a temporary directory and
renamed into place, so a crash never leaves a half-built cache.

Call :func:`prepare_default_corpus` on ONE process (e.g. global rank 0), then barrier, then let
every rank call it again (a cache hit). Concurrent builders are safe (the loser of the final
rename discards its copy) but waste time.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile

from megatron_staged.data.preprocess import preprocess_data
from megatron_staged.data.train_tokenizer import train_sentencepiece

_VERSION = 2  # bump when the build recipe changes, to invalidate old caches
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_MANIFEST = "corpus.json"
SHUFFLE_SEED = 1234  # document order of the corpus; part of the build recipe (bump _VERSION to change)


def stdlib_files() -> list[str]:
    """Paths (relative to the stdlib root) of every candidate ``.py`` file, in sorted walk order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files += [os.path.relpath(os.path.join(dirpath, n), root) for n in sorted(names) if n.endswith(".py")]
    return files


def stdlib_documents(max_bytes: int, seed: int = SHUFFLE_SEED) -> list[tuple[str, str]]:
    """(relative path, source) of stdlib .py files, shuffled with ``seed``, at most max_bytes total.

    The sorted file list is shuffled by ``random.Random(seed)`` (deterministic), then taken in
    that order; files that do not decode as UTF-8, are empty, or do not fit in the remaining budget
    are skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    docs, total = [], 0
    for rel in files:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and total + len(raw) <= max_bytes:
            docs.append((rel, text))
            total += len(raw)
    return docs


def _cache_key(vocab_size: int, max_bytes: int) -> str:
    ident = f"v{_VERSION}|{SHUFFLE_SEED}|{vocab_size}|{max_bytes}|{sys.version}|{sysconfig.get_paths()['stdlib']}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _result(final_dir: str, manifest: dict, from_cache: bool) -> dict:
    return {"data_prefix": os.path.join(final_dir, manifest["data_prefix"]),
            "tokenizer_model": os.path.join(final_dir, manifest["tokenizer_model"]),
            "num_documents": manifest["num_documents"], "num_tokens": manifest["num_tokens"],
            "from_cache": from_cache}


def prepare_default_corpus(cache_dir: str, vocab_size: int = 4096,
                           max_bytes: int = 8_000_000) -> dict:
    """Build (or load from cache) the stdlib corpus.

    Returns ``{"data_prefix": str (for --data-path), "tokenizer_model": str (sentencepiece
    .model for --tokenizer-model), "num_documents": int, "num_tokens": int (EODs included),
    "from_cache": bool}``. Takes about a minute for 8 MB on 2 cores. Run it on one process only.
    Documents are in shuffled order (module docstring), so Megatron's split by document index
    gives a validation set drawn from the same distribution as training.
    """
    key = _cache_key(vocab_size, max_bytes)
    final_dir = os.path.join(os.path.abspath(cache_dir), f"stdlib-{key}")
    manifest_path = os.path.join(final_dir, _MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            return _result(final_dir, json.load(f), from_cache=True)

    os.makedirs(cache_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".stdlib-build-", dir=cache_dir)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        manifest = _build(tmp_dir, vocab_size, max_bytes)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            # Another process finished first; its copy is identical (deterministic build).
            if not os.path.isfile(manifest_path):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return _result(final_dir, manifest, from_cache=False)


def _build(out_dir: str, vocab_size: int, max_bytes: int) -> dict:
    """Write corpus.jsonl, tokenizer.model, corpus_text_document.bin/.idx and the manifest."""
    docs = stdlib_documents(max_bytes)
    jsonl = os.path.join(out_dir, "corpus.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for path, text in docs:
            f.write(json.dumps({"path": path, "text": text}) + "\n")
    model = train_sentencepiece(jsonl, os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size,
                                num_threads=2)
    # workers=1: the caller may be a trainer rank with live process groups; do not fork it.
    stats = preprocess_data(jsonl, os.path.join(out_dir, "corpus"), "GPTSentencePieceTokenizer",
                       tokenizer_model=model, append_eod=True, workers=1, log=lambda msg: None)
    manifest = {"data_prefix": "corpus_text_document", "tokenizer_model": "tokenizer.model",
                "num_documents": stats["num_documents"]["text"],
                "num_tokens": stats["num_tokens"]["text"], "vocab_size": vocab_size,
                "max_bytes": max_bytes, "shuffle_seed": SHUFFLE_SEED, "python": sys.version,
                "files": [path for path, _ in docs]}
    with open(os.path.join(out_dir, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
