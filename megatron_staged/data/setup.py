"""Tokenizer and datasets for a run, from the config (the trainer's one entry into data/)."""
from __future__ import annotations

import os

from megatron_staged.config import Config, require_data_source
from megatron_staged.errors import UserError
from megatron_staged.runtime.distributed import barrier, is_rank0, print_rank0


def default_corpus_dir(cfg: Config) -> str:
    return cfg.data.default_corpus_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megatron_staged", "corpus")


def use_default_corpus(cfg: Config) -> None:
    """--builtin-corpus: build (rank 0) or reuse the built-in stdlib corpus and its tokenizer."""
    from megatron_staged.data import prepare_default_corpus

    d = cfg.data
    cache = default_corpus_dir(cfg)
    info = None
    if is_rank0():
        info = prepare_default_corpus(cache, max_bytes=d.builtin_corpus_max_bytes)
    barrier()
    if info is None:
        info = prepare_default_corpus(cache, max_bytes=d.builtin_corpus_max_bytes)  # served from the cache rank 0 just filled
    d.data_path = [info["data_prefix"]]
    d.builtin_corpus = False  # resolved: from here on an ordinary --data-path run (stages re-validate it)
    if "split" not in getattr(cfg, "_explicit", set()):
        d.split = "95,5,0"  # a few hundred documents: Megatron's 969,30,1 leaves the test split empty
    d.tokenizer_type = "GPTSentencePieceTokenizer"
    d.tokenizer_model = info["tokenizer_model"]
    print_rank0(f"using the built-in corpus {info['data_prefix']} ({info.get('num_tokens', '?')} tokens)")


def sample_counts(cfg: Config) -> tuple[int, int, int]:
    t = cfg.training
    gbs = t.global_batch_size
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 1
    return t.train_iters * gbs, max(evals * t.eval_iters * gbs, gbs), max(t.eval_iters * gbs, gbs)


def prepare_data(cfg: Config, world_size: int):
    """Returns (tokenizer, (train, valid, test) datasets)."""
    from megatron_staged.data import build_gpt_datasets, build_tokenizer

    d, m = cfg.data, cfg.model
    if d.builtin_corpus:
        use_default_corpus(cfg)
    else:
        require_data_source(d)
    ttype = d.tokenizer_type
    if ttype is None and d.vocab_file and d.merge_file:
        ttype = d.tokenizer_type = "GPT2BPETokenizer"  # what NVIDIA's GPT-3 example means (it gives no type)
        print_rank0("note: --vocab-file and --merge-file without --tokenizer-type: using GPT2BPETokenizer")
    if ttype is None:
        if d.mock_data:
            ttype = "NullTokenizer"
        else:
            raise UserError("--data-path needs --tokenizer-type (e.g. GPT2BPETokenizer with --vocab-file and "
                            "--merge-file, or HuggingFaceTokenizer/SentencePieceTokenizer with --tokenizer-model)")
    if ttype == "NullTokenizer" and m.vocab_size is None:
        if d.mock_data:
            m.vocab_size = 1024
        else:
            raise UserError("--tokenizer-type NullTokenizer needs --vocab-size")
    tokenizer = build_tokenizer(ttype, d.tokenizer_model, m.vocab_size, vocab_file=d.vocab_file,
                                merge_file=d.merge_file, tiktoken_pattern=d.tiktoken_pattern,
                                tiktoken_num_special_tokens=d.tiktoken_num_special_tokens)
    train, valid, test = sample_counts(cfg)
    datasets = build_gpt_datasets(
        data_path=d.data_path or None, split=d.split, mock_data=d.mock_data, seq_length=m.seq_length,
        seed=cfg.training.seed, tokenizer=tokenizer, train_samples=train, valid_samples=valid,
        test_samples=test, cache_path=d.data_cache_path, train_data_path=d.train_data_path or None,
        valid_data_path=d.valid_data_path or None, test_data_path=d.test_data_path or None,
        eod_mask_loss=d.eod_mask_loss, reset_position_ids=d.reset_position_ids,
        require_train=False)  # evaluate needs only the valid split; Trainer.train() requires the train one
    return tokenizer, datasets
