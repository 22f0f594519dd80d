"""Tokenizers with the interface megatron-core's datasets and Megatron users expect.

Every tokenizer exposes

* ``vocab_size`` (int): number of token ids; ids are in ``[0, vocab_size)``;
* ``eod`` (int): the end-of-document id that ``tools/preprocess_data.py --append-eod`` appends;
* ``pad`` (int): the padding id, ``-1`` when the tokenizer has none (megatron-core's GPTDataset
  then pads with -1, maps it to id 0 and masks it out of the loss);
* ``bos`` (int | None);
* ``unique_identifiers`` (dict): hashed by megatron-core into its dataset-index cache keys;
* ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``.

This module imports neither torch nor megatron-core, so the preprocessing worker processes stay
light. It deliberately does not subclass megatron-core's tokenizer base classes: the legacy one
logs a deprecation warning per instance and the new one requires chat-template methods.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from megatron_staged.errors import UserError, require

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer")


class Tokenizer:
    """Common base: subclasses set ``_vocab_size``, ``_eod``, ``_pad``, ``_bos`` and identifiers."""

    _vocab_size: int
    _eod: int
    _pad: int = -1
    _bos: int | None = None

    def __init__(self, model_path: str | None, **options) -> None:
        self.unique_identifiers = OrderedDict(
            {"class": type(self).__name__,
             "tokenizer_path": [os.path.abspath(model_path)] if model_path else []}
        )
        for key, value in options.items():
            self.unique_identifiers[key] = str(value)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int | None:
        return self._bos

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


class GPTSentencePieceTokenizer(Tokenizer):
    """Megatron-LM's GPTSentencePieceTokenizer: a sentencepiece ``.model`` file's pieces only, no BOS
    added, EOD = the model's eos piece. The built-in corpus uses it."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        kind = type(self).__name__
        require(model_path is not None,
                f"--tokenizer-model is required with --tokenizer-type {kind} "
                "(a sentencepiece .model file; train one with tools/train_tokenizer.py)")
        require(os.path.isfile(model_path),
                f"--tokenizer-model: no sentencepiece model at {model_path} "
                "(train one with tools/train_tokenizer.py)")
        super().__init__(model_path)
        self.model_path = model_path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.load(model_path)
        except (OSError, RuntimeError) as err:
            raise UserError(f"--tokenizer-model: {model_path} is not a sentencepiece model "
                            f"({err})") from err
        self._vocab_size = self._sp.get_piece_size()
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else -1
        self._bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self._setup_specials()

    def _setup_specials(self) -> None:
        eos = self._sp.eos_id()
        require(eos >= 0,
                f"--tokenizer-model: sentencepiece model {self.model_path} defines no eos piece, "
                f"which {type(self).__name__} uses as the end-of-document token; retrain it with "
                "tools/train_tokenizer.py (which defines eos), or use --tokenizer-type SentencePieceTokenizer "
                "(which adds <EOD>)")
        self._eod = eos

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    # The processor wraps a C++ object; pickle the path instead (for worker processes).
    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron-LM's ``--tokenizer-type SentencePieceTokenizer`` (``_SentencePieceTokenizer``).

    Special tokens are appended after the model's pieces, in Megatron-LM's order, unless the model
    already has a piece of that name: ``<CLS> <SEP> <EOD> <MASK>``, then the model's pad, bos and eos
    pieces (``<PAD> <BOS> <EOS>`` when the model defines none). EOD is ``<EOD>`` (not eos). A special
    token's text inside a document is encoded as that token, as Megatron-LM does; ``vocab_size``
    counts the added tokens. (``--vocab-extra-ids`` is not supported.)
    """

    SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")

    def _setup_specials(self) -> None:
        sp = self._sp
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self._specials: dict[str, int] = {}

        def add(token: str) -> int:
            if token not in vocab:
                vocab[token] = len(vocab)
            self._specials[token] = vocab[token]
            return vocab[token]

        self.cls, self.sep, self._eod, self.mask = (add(t) for t in self.SPECIALS)

        def model_piece(i: int, fallback: str) -> str:
            return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else fallback

        self._pad = add(model_piece(sp.pad_id(), "<PAD>"))
        self._bos = add(model_piece(sp.bos_id(), "<BOS>"))
        self._eos = add(model_piece(sp.eos_id(), "<EOS>"))
        self._inv_specials = {i: t for t, i in self._specials.items()}
        self._vocab_size = len(vocab)

    @property
    def eos(self) -> int:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        """Megatron-LM's: split at the earliest special token's text (on a tie, the first in the order
        above), encode the text between with sentencepiece."""
        ids, idx = [], 0
        while True:
            found = {}
            for token in self._specials:
                j = text.find(token, idx)
                if j >= 0:
                    found[token] = j
            if not found:
                break
            token = min(found, key=found.get)
            ids.extend(self._sp.encode(text[idx:found[token]]))
            ids.append(self._specials[token])
            idx = found[token] + len(token)
        ids.extend(self._sp.encode(text[idx:]))
        return ids

    def detokenize(self, ids) -> str:
        """Megatron-LM's: special tokens rendered as their text with a space either side."""
        ids = [int(i) for i in ids]
        text, last = "", 0
        for i, t in enumerate(ids):
            if t in self._inv_specials:
                text += self._sp.decode(ids[last:i]) + " " + self._inv_specials[t] + " "
                last = i + 1
        return text + self._sp.decode(ids[last:])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron-LM's Llama2Tokenizer: like GPTSentencePieceTokenizer, but BOS is prepended to every
    document (Megatron's ``tokenize(s, bos=True, eos=False)``)."""

    def __init__(self, model_path: str) -> None:
        super().__init__(model_path)
        require(self._bos is not None,
                f"--tokenizer-model: sentencepiece model {model_path} defines no bos piece, which "
                "Llama2Tokenizer prepends to every document; use GPTSentencePieceTokenizer")

    def tokenize(self, text: str) -> list[int]:
        return [self._bos] + self._sp.encode(text)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other runs, whitespace
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class GPT2BPETokenizer(Tokenizer):
    """Megatron-LM's GPT2BPETokenizer: byte-level BPE from a local ``vocab.json`` and ``merges.txt``.

    ``vocab_size`` is the number of entries in vocab.json and EOD is ``<|endoftext|>``'s id, as in
    Megatron-LM; the text ``<|endoftext|>`` inside a document is encoded as ordinary text (Megatron
    registers no special tokens). Pure Python (with the ``regex`` package); nothing is downloaded.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        import json

        import regex

        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            require(path is not None, f"{flag} is required with --tokenizer-type GPT2BPETokenizer "
                                      "(GPT-2's vocab.json and merges.txt, local files)")
            require(os.path.isfile(path), f"{flag}: no file at {path}")
        super().__init__(vocab_file, merge_file=os.path.abspath(merge_file))
        self.vocab_file, self.merge_file = vocab_file, merge_file
        try:
            with open(vocab_file, encoding="utf-8") as fh:
                self.encoder: dict[str, int] = json.load(fh)
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"--vocab-file: {vocab_file} is not a JSON vocabulary ({err})") from err
        with open(merge_file, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(l.split()) for l in lines if l.strip()]
        require(all(len(m) == 2 for m in merges), f"--merge-file: {merge_file} is not a BPE merges file "
                                                  "(each line: two symbols)")
        require("<|endoftext|>" in self.encoder,
                f"--vocab-file: {vocab_file} has no <|endoftext|> token (GPT2BPETokenizer's end-of-document)")
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = regex.compile(_GPT2_PATTERN)
        self.cache: dict[str, list[str]] = {}
        self._vocab_size = len(self.encoder)
        self._eod = self.encoder["<|endoftext|>"]

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until no merge applies."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for tok in self._bpe(symbols):
                require(tok in self.encoder, f"GPT2BPETokenizer: {tok!r} (a merge result) is not in "
                                             f"{self.vocab_file}; vocab and merges do not match")
                ids.append(self.encoder[tok])
        return ids

    def detokenize(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def __getstate__(self):
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file}

    def __setstate__(self, state):
        self.__init__(state["vocab_file"], state["merge_file"])


class HuggingFaceTokenizer(Tokenizer):
    """A local HuggingFace tokenizer directory or file; EOD is its eos token. Never downloads.

    ``tokenize`` calls the tokenizer with its default special tokens, as Megatron-LM does (a
    Llama tokenizer therefore prepends BOS).
    """

    def __init__(self, model_path: str) -> None:
        require(model_path is not None,
                "--tokenizer-model is required with --tokenizer-type HuggingFaceTokenizer "
                "(a local directory holding tokenizer.json / tokenizer_config.json)")
        require(os.path.exists(model_path),
                f"--tokenizer-model: no HuggingFace tokenizer at {model_path} (expected a local "
                "directory saved with tokenizer.save_pretrained(); nothing is downloaded)")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        super().__init__(model_path)
        self.model_path = model_path
        try:
            self._tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"--tokenizer-model: cannot load a HuggingFace tokenizer from "
                            f"{model_path}: {err}") from err
        require(self._tok.eos_token_id is not None,
                f"--tokenizer-model: HuggingFace tokenizer at {model_path} has no eos token, "
                "which this project uses as the end-of-document token")
        self._vocab_size = len(self._tok)  # includes added tokens, unlike tok.vocab_size
        self._eod = self._tok.eos_token_id
        self._pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else -1
        self._bos = self._tok.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok(text).input_ids)

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: text is whitespace-separated integer ids.

    As in Megatron, ``--vocab-size V`` means ids ``0..V-1`` plus one EOD id ``V``, so
    ``vocab_size == V + 1`` and ``eod == vocab_size - 1``. There is no pad id (``pad == -1``).
    """

    def __init__(self, vocab_size: int) -> None:
        require(vocab_size is not None and int(vocab_size) > 0,
                "--vocab-size (a positive integer) is required with --tokenizer-type "
                "NullTokenizer")
        super().__init__(None, vocab_size=int(vocab_size))
        self._vocab_size = int(vocab_size) + 1
        self._eod = int(vocab_size)

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError as err:
            raise UserError(f"NullTokenizer expects whitespace-separated integers, got "
                            f"{text[:60]!r}") from err
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        require(not bad, f"NullTokenizer: ids {bad[:5]} outside [0, {self._vocab_size})")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None,
                    vocab_size: int | None = None, *, vocab_file: str | None = None,
                    merge_file: str | None = None, tiktoken_pattern: str | None = None,
                    tiktoken_num_special_tokens: int = 1000) -> Tokenizer:
    """Build a tokenizer from Megatron's ``--tokenizer-type/--tokenizer-model/--vocab-size``
    (and ``--vocab-file/--merge-file`` for GPT2BPETokenizer, ``--tiktoken-*`` for TikTokenizer)."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "TikTokenizer":
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            raise UserError("--tokenizer-type TikTokenizer needs the tiktoken package, which is not "
                            "installed; pip install tiktoken, or use HuggingFaceTokenizer") from None
        raise UserError("--tokenizer-type TikTokenizer is not implemented yet; convert the tokenizer to a "
                        "HuggingFace tokenizer.json and use --tokenizer-type HuggingFaceTokenizer")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise UserError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
                    f"{', '.join(TOKENIZER_TYPES)}")
