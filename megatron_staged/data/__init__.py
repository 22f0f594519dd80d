"""Data layer: tokenizers, .bin/.idx preprocessing, the built-in corpus, GPT datasets.

Names are re-exported lazily so that importing a light submodule (the tokenizer, used by the
preprocessing worker processes) does not import torch and megatron-core.
"""
import importlib

_EXPORTS = {
    "build_tokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "preprocess_data": "preprocess",
    "expand_inputs": "preprocess",
    "train_sentencepiece": "train_tokenizer",
    "train_sentencepiece_from_texts": "train_tokenizer",
    "prepare_default_corpus": "corpus",
    "build_gpt_datasets": "datasets",
    "build_data_iterator": "datasets",
    "PretrainingSampler": "datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
