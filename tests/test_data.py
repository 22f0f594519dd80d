"""Tests of the data layer: tokenizers, preprocessing, corpus, datasets, sampler, iterator."""
import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import numpy
import pytest
import torch

from megatron_staged.data import (
    PretrainingSampler,
    build_data_iterator,
    build_gpt_datasets,
    build_tokenizer,
    preprocess_data,
    prepare_default_corpus,
    train_sentencepiece_from_texts,
)
from megatron_staged.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]


def _stdlib_text(name):
    with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
        return f.read()


DOCS = [
    _stdlib_text("bisect.py"),
    "Ünïcödé text — with a dash, tabs\tand\nnewlines.\n",
    "",                      # empty: must be skipped
    "   \n\t ",              # blank: must be skipped
    _stdlib_text("heapq.py"),
    "x = 1",
]
NONEMPTY = [d for d in DOCS if d.strip()]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = [_stdlib_text(n) for n in ("abc.py", "bisect.py", "heapq.py", "fnmatch.py")]
    return train_sentencepiece_from_texts(texts, str(out / "tok"), vocab_size=400)


@pytest.fixture(scope="module")
def sp_tok(sp_model):
    return build_tokenizer("GPTSentencePieceTokenizer", sp_model)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, sp_model):
    """A .bin/.idx dataset of DOCS written by the preprocess tool run as a script."""
    out = tmp_path_factory.mktemp("data")
    jsonl = out / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(jsonl),
         "--output-prefix", str(out / "docs"), "--tokenizer-type", "GPTSentencePieceTokenizer",
         "--tokenizer-model", sp_model, "--append-eod", "--workers", "2", "--log-interval", "1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(out / "docs_text_document"), proc.stderr


def _read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [list(map(int, ds[i])) for i in range(len(ds))]


# ---- tokenizers ---------------------------------------------------------------------------------

def test_sentencepiece_tokenizer(sp_tok, sp_model):
    assert sp_tok.vocab_size == 400
    assert (sp_tok.eod, sp_tok.pad, sp_tok.bos) == (2, 3, 1)
    assert sp_tok.unique_identifiers["class"] == "GPTSentencePieceTokenizer"
    assert sp_tok.unique_identifiers["tokenizer_path"] == [os.path.abspath(sp_model)]
    for text in NONEMPTY:  # identity normalization + byte fallback: exact round trip
        ids = sp_tok.tokenize(text)
        assert all(0 <= i < sp_tok.vocab_size for i in ids)
        assert sp_tok.detokenize(ids) == text


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod, tok.pad) == (101, 100, -1)  # Megatron: V ids + EOD
    assert tok.tokenize("5 7  99\n3") == [5, 7, 99, 3]
    assert tok.detokenize([5, 7]) == "5 7"
    with pytest.raises(UserError):
        tok.tokenize("5 x")


def test_huggingface_tokenizer_local_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, "hello": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(tmp_path / "hf")
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    assert (tok.vocab_size, tok.eod, tok.pad) == (5, 1, 2)
    assert tok.tokenize("hello world hello") == [3, 4, 3]
    assert tok.unique_identifiers["class"] == "HuggingFaceTokenizer"


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(UserError, match="no sentencepiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(UserError, match="not a sentencepiece model"):
        (tmp_path / "junk.model").write_text("junk")
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "junk.model"))
    with pytest.raises(UserError, match="no HuggingFace tokenizer"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(UserError, match="not supported"):
        build_tokenizer("BertWordPieceLowerCase")
    with pytest.raises(UserError, match="--vocab-file is required"):
        build_tokenizer("GPT2BPETokenizer")


# ---- preprocessing ------------------------------------------------------------------------------

def test_preprocess_tool_roundtrip(indexed, sp_tok):
    prefix, log = indexed
    docs = _read_docs(prefix)
    assert docs == [sp_tok.tokenize(d) + [sp_tok.eod] for d in NONEMPTY]
    assert all(len(d) > 1 for d in docs)
    assert "2 empty skipped" in log
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(prefix)[0].dtype == numpy.uint16  # vocab 400 fits
    assert not [f for f in os.listdir(os.path.dirname(prefix)) if ".tmp" in f]


def test_preprocess_plain_text(tmp_path, sp_model, sp_tok):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first document\nstill first\n")
    (src / "sub" / "b.txt").write_text("second document")
    (src / "empty.txt").write_text("")
    stats = preprocess_data(str(src), str(tmp_path / "plain"), "GPTSentencePieceTokenizer", sp_model,
                       append_eod=True, log=lambda m: None)
    # sorted walk: a.txt, empty.txt (skipped), then sub/b.txt
    expected = ["first document\nstill first\n", "second document"]
    assert _read_docs(stats["prefixes"]["text"]) == [sp_tok.tokenize(t) + [2] for t in expected]
    assert stats["skipped_empty"]["text"] == 1

    stats = preprocess_data(str(src / "a.txt"), str(tmp_path / "lines"), "GPTSentencePieceTokenizer",
                       sp_model, text_document_per_line=True, log=lambda m: None)
    assert _read_docs(stats["prefixes"]["text"]) == [
        sp_tok.tokenize("first document"), sp_tok.tokenize("still first")]  # no --append-eod


def test_preprocess_bad_input(tmp_path, sp_model):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(UserError, match=r"x.jsonl:1 has no key"):
        preprocess_data(str(jsonl), str(tmp_path / "o"), "GPTSentencePieceTokenizer", sp_model)
    jsonl.write_text(json.dumps({"text": "  "}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(UserError, match="no non-empty documents"):
        preprocess_data(str(jsonl), str(tmp_path / "o"), "GPTSentencePieceTokenizer", sp_model,
                   workers=2)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o_")]  # nothing half-written
    jsonl.write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        preprocess_data(str(jsonl), str(tmp_path / "o"), "GPTSentencePieceTokenizer", sp_model)
    with pytest.raises(UserError, match="matches no files"):
        preprocess_data(str(tmp_path / "nothing*.jsonl"), str(tmp_path / "o"),
                   "GPTSentencePieceTokenizer", sp_model)
    from megatron_staged.data.preprocess import main

    assert main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer-type", "GPTSentencePieceTokenizer",
                 "--tokenizer-model", str(tmp_path / "none.model")]) == 2


def test_train_tokenizer_tool(tmp_path):
    from megatron_staged.data.train_tokenizer import main

    (tmp_path / "t.txt").write_text(_stdlib_text("fnmatch.py"))
    # far more pieces than a 6 KB text supports: sentencepiece's error becomes exit status 2
    assert main(["--input", str(tmp_path), "--model-prefix", str(tmp_path / "u"),
                 "--vocab-size", "20000", "--model-type", "unigram"]) == 2
    assert main(["--input", str(tmp_path / "t.txt"), "--model-prefix", str(tmp_path / "m"),
                 "--vocab-size", "400"]) == 0
    tok = build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "m.model"))
    assert (tok.vocab_size, tok.eod, tok.pad) == (400, 2, 3)
    (tmp_path / "blank.txt").write_text("\n\n")
    assert main(["--input", str(tmp_path / "blank.txt"), "--model-prefix",
                 str(tmp_path / "b")]) == 2


# ---- sampler and iterator -----------------------------------------------------------------------

def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_resumes_exactly():
    full = _take(PretrainingSampler(1000, 0, 3, 1, 2), 20)
    # consume 7 steps (7 * mbs * dp samples), then restart a fresh sampler from there
    resumed = _take(PretrainingSampler(1000, 7 * 3 * 2, 3, 1, 2), 13)
    assert resumed == full[7:]
    assert full[0] == [3, 4, 5] and full[1] == [9, 10, 11]


def test_sampler_global_batch_independent_of_dp_size():
    mbs, gbs, consumed = 2, 8, 40
    # dp=1: gbs/mbs micro-batches per step; dp=4: one micro-batch per rank per step
    dp1 = _take(PretrainingSampler(500, consumed, mbs, 0, 1), gbs // mbs)
    dp4 = [_take(PretrainingSampler(500, consumed, mbs, r, 4), 1)[0] for r in range(4)]
    dp2 = [_take(PretrainingSampler(500, consumed, mbs, r, 2), 2) for r in range(2)]
    global1 = sorted(i for mb in dp1 for i in mb)
    assert global1 == list(range(consumed, consumed + gbs))
    assert sorted(i for mb in dp4 for i in mb) == global1
    assert sorted(i for r in dp2 for mb in r for i in mb) == global1
    assert dp4 == dp1  # same order: rank r of dp4 gets dp1's r-th micro-batch


def test_sampler_stops_or_cycles():
    assert len(list(PretrainingSampler(10, 0, 2, 0, 2))) == 2  # last partial chunk dropped
    with pytest.raises(UserError):
        PretrainingSampler(10, 10, 2, 0, 2)
    cyc = _take(PretrainingSampler(10, 8, 2, 1, 2, cycle=True), 2)
    assert cyc == [[0, 1], [4, 5]]  # stream positions 10,11 and 14,15 wrap to 0,1 and 4,5


# ---- datasets -----------------------------------------------------------------------------------

def test_missing_prefix_is_user_error(tmp_path, sp_tok):
    prefix = str(tmp_path / "nope_text_document")
    with pytest.raises(UserError) as err:
        build_gpt_datasets(data_path=[prefix], split="98,2,0", mock_data=False, seq_length=16,
                           seed=1, tokenizer=sp_tok, train_samples=10, valid_samples=1,
                           test_samples=0)
    assert str(err.value) == (
        f"--data-path: no indexed dataset at {prefix} (expected {prefix}.bin and {prefix}.idx;"
        " build one with tools/preprocess_data.py)")
    with pytest.raises(UserError, match="--data-path"):
        build_gpt_datasets(data_path=None, split=None, mock_data=False, seq_length=16, seed=1,
                           tokenizer=sp_tok, train_samples=10, valid_samples=1, test_samples=0)


def test_split_without_tokens_is_user_error(indexed, sp_tok, tmp_path):
    prefix, _ = indexed  # 4 documents: "98,2,0" leaves valid with round(4*.98)..4 = 0 docs
    with pytest.raises(UserError, match="valid split .* 0 tokens"):
        build_gpt_datasets(data_path=[prefix], split="98,2,0", mock_data=False, seq_length=16,
                           seed=1, tokenizer=sp_tok, train_samples=10, valid_samples=1,
                           test_samples=0, cache_path=str(tmp_path))
    with pytest.raises(UserError, match="--split"):
        build_gpt_datasets(data_path=[prefix], split="a,b", mock_data=False, seq_length=16,
                           seed=1, tokenizer=sp_tok, train_samples=10, valid_samples=1,
                           test_samples=0, cache_path=str(tmp_path))


def _check_sample(sample, seq, vocab):
    assert sample["tokens"].shape == (seq,) and sample["tokens"].dtype == torch.int64
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # next-token labels
    assert torch.equal(sample["position_ids"], torch.arange(seq))
    assert int(sample["tokens"].max()) < vocab and int(sample["tokens"].min()) >= 0


def _as_text(ids):
    return "," + ",".join(map(str, ids)) + ","


def test_gpt_datasets_and_iterator(indexed, sp_tok, tmp_path):
    prefix, _ = indexed
    seq = 32
    kw = dict(data_path=[prefix], split="3,1,0", mock_data=False, seq_length=seq, seed=5,
              tokenizer=sp_tok, train_samples=300, valid_samples=5, test_samples=0,
              cache_path=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(**kw)
    assert test is None and len(train) >= 300 and len(valid) >= 5
    docs = _read_docs(prefix)
    assert sorted(set(numpy.asarray(train.document_index).tolist())) == [0, 1, 2]  # 3 of 4 docs
    # every sample is a window of the train documents concatenated in megatron's epoch order
    stream = _as_text([t for d in train.document_index for t in docs[d]])
    for i in range(len(train)):
        s = train[i]
        _check_sample(s, seq, sp_tok.vocab_size)
        assert "attention_mask" not in s
        assert torch.all(s["loss_mask"] == 1)
        assert _as_text(s["tokens"].tolist() + s["labels"][-1:].tolist()) in stream, i
    # a second build is served from the index cache and gives identical samples
    train2, _, _ = build_gpt_datasets(**kw)
    assert torch.equal(train2[7]["tokens"], train[7]["tokens"])

    # iterator: dp=2 ranks together give the dp=1 micro-batches, and resuming matches
    dp1 = build_data_iterator(train, 8, 2, 0, 1)
    b0, b1 = next(dp1), next(dp1)
    assert b0["tokens"].shape == (2, seq) and b0["loss_mask"].dtype == torch.float32
    r0 = next(build_data_iterator(train, 8, 2, 0, 2))
    r1 = next(build_data_iterator(train, 8, 2, 1, 2))
    assert torch.equal(r0["tokens"], b0["tokens"]) and torch.equal(r1["tokens"], b1["tokens"])
    resumed = next(build_data_iterator(train, 10, 2, 0, 1))
    assert torch.equal(resumed["labels"], b1["labels"])
    assert torch.equal(next(build_data_iterator(train, 2, 2, 0, 1, num_workers=1))["tokens"],
                       torch.stack([train[2]["tokens"], train[3]["tokens"]]))


def test_eod_mask_loss_and_reset_position_ids(indexed, sp_tok, tmp_path):
    """Megatron-LM's --eod-mask-loss (no loss where the input token is end-of-document) and
    --reset-position-ids (positions count from 0 again after each end-of-document token)."""
    prefix, _ = indexed
    seq, eod = 48, sp_tok.eod
    kw = dict(data_path=[prefix], split="1,0,0", mock_data=False, seq_length=seq, seed=5, tokenizer=sp_tok,
              train_samples=40, valid_samples=0, test_samples=0, cache_path=str(tmp_path / "cache"))
    plain, _, _ = build_gpt_datasets(**kw)
    masked, _, _ = build_gpt_datasets(**kw, eod_mask_loss=True, reset_position_ids=True)
    crossings = 0
    for i in range(len(plain)):
        a, b = plain[i], masked[i]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
        tokens = b["tokens"].tolist()
        assert b["loss_mask"].tolist() == [0.0 if t == eod else 1.0 for t in tokens]
        expected, pos = [], 0
        for t in tokens:
            expected.append(pos)
            pos = 0 if t == eod else pos + 1
        assert b["position_ids"].tolist() == expected
        crossings += tokens[:-1].count(eod)
    assert crossings > 0  # the samples do cross document boundaries (the check above has teeth)


def test_iterator_cycles_when_exhausted(indexed, sp_tok, tmp_path, caplog):
    prefix, _ = indexed
    _, valid, _ = build_gpt_datasets(
        data_path=[prefix], split="3,1,0", mock_data=False, seq_length=32, seed=5,
        tokenizer=sp_tok, train_samples=10, valid_samples=1, test_samples=0,
        cache_path=str(tmp_path))
    n = len(valid)
    it = build_data_iterator(valid, 0, 1, 0, 1)
    first = [next(it)["tokens"] for _ in range(n)]
    with caplog.at_level("WARNING"):
        again = next(it)["tokens"]
    assert torch.equal(again, first[0])
    assert "cycling" in caplog.text


def test_blend_with_weights(indexed, tmp_path, sp_model, sp_tok):
    prefix, _ = indexed
    (tmp_path / "x.txt").write_text(_stdlib_text("fnmatch.py"))
    other = preprocess_data(str(tmp_path / "x.txt"), str(tmp_path / "other"),
                            "GPTSentencePieceTokenizer", sp_model, append_eod=True,
                            log=lambda m: None)["prefixes"]["text"]
    train, _, _ = build_gpt_datasets(
        data_path=["0.3", prefix, "0.7", other], split="1", mock_data=False, seq_length=16,
        seed=1, tokenizer=sp_tok, train_samples=100, valid_samples=0, test_samples=0,
        cache_path=str(tmp_path / "cache"))
    assert len(train) == 100
    counts = numpy.bincount(numpy.asarray(train.dataset_index), minlength=2)
    assert counts.tolist() == [30, 70]
    _check_sample(train[3], 16, sp_tok.vocab_size)


def test_mock_data(sp_tok):
    train, valid, test = build_gpt_datasets(
        data_path=None, split=None, mock_data=True, seq_length=24, seed=3, tokenizer=sp_tok,
        train_samples=50, valid_samples=5, test_samples=5)
    assert len(train) >= 50 and valid is not None and test is not None
    s = train[0]
    _check_sample(s, 24, sp_tok.vocab_size)
    batch = next(build_data_iterator(train, 0, 4, 0, 1))
    assert batch["tokens"].shape == (4, 24)
    with pytest.raises(UserError, match="--mock-data cannot"):
        build_gpt_datasets(data_path=["x"], split=None, mock_data=True, seq_length=24, seed=3,
                           tokenizer=sp_tok, train_samples=5, valid_samples=0, test_samples=0)


# ---- built-in corpus ----------------------------------------------------------------------------

def test_default_corpus_builds_and_caches(tmp_path):
    import time

    info = prepare_default_corpus(str(tmp_path), vocab_size=1024, max_bytes=1_000_000)
    assert info["from_cache"] is False
    assert info["num_documents"] >= 10
    tok = build_tokenizer("GPTSentencePieceTokenizer", info["tokenizer_model"])
    assert tok.vocab_size == 1024
    docs = _read_docs(info["data_prefix"])
    assert len(docs) == info["num_documents"]
    assert sum(map(len, docs)) == info["num_tokens"]
    assert all(d[-1] == tok.eod and len(d) > 1 for d in docs)
    with open(os.path.join(os.path.dirname(info["data_prefix"]), "corpus.json")) as f:
        files = json.load(f)["files"]
    assert len(files) == len(docs)
    assert tok.detokenize(docs[0][:-1]) == _stdlib_text(files[0])  # exact round trip
    assert 500_000 < sum(os.path.getsize(os.path.join(STDLIB, p)) for p in files) <= 1_000_000
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".stdlib-build-")]

    t0 = time.time()
    again = prepare_default_corpus(str(tmp_path), vocab_size=1024, max_bytes=1_000_000)
    assert again["from_cache"] is True and time.time() - t0 < 1.0
    assert {k: v for k, v in again.items() if k != "from_cache"} == \
        {k: v for k, v in info.items() if k != "from_cache"}


def test_default_corpus_documents_are_shuffled_so_validation_is_a_random_sample():
    """Megatron splits by document index (the last 5% validate). Written in sorted file order the
    validation split would be the alphabetically last modules; the corpus shuffles documents
    (deterministically) so both the byte cut and the validation tail sample the whole stdlib."""
    from megatron_staged.data.corpus import stdlib_documents

    # oracle: every decodable non-empty non-test stdlib .py file, listed here independently
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    everything = {}
    for dirpath, dirs, names in os.walk(STDLIB):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for n in names:
            if n.endswith(".py"):
                try:
                    text = open(os.path.join(dirpath, n), "rb").read().decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if text.strip():
                    everything[os.path.relpath(os.path.join(dirpath, n), STDLIB)] = text
    docs = stdlib_documents(10 ** 12)
    paths = [p for p, _ in docs]
    assert sorted(paths) == sorted(everything) and all(everything[p] == t for p, t in docs)
    assert paths == [p for p, _ in stdlib_documents(10 ** 12)]  # deterministic
    assert paths != sorted(paths)
    # the validation tail (last 5%) is spread over the sorted order, not its last 5%
    rank = {p: i / len(paths) for i, p in enumerate(sorted(paths))}
    tail = [rank[p] for p in paths[-max(20, len(paths) // 20):]]
    assert min(tail) < 0.25 and max(tail) > 0.75 and 0.3 < sum(tail) / len(tail) < 0.7
    # a byte cut is a prefix of the same shuffled order (fits greedily) and is no longer sorted
    cut = [p for p, _ in stdlib_documents(1_000_000)]
    assert cut == [p for p in paths if p in set(cut)] and cut != sorted(cut)
    assert sum(len(everything[p].encode()) for p in cut) <= 1_000_000


# ---- torch.distributed --------------------------------------------------------------------------

_DIST_SCRIPT = """
import os, sys, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist, torch.multiprocessing as mp
# import megatron-core once here; the forked ranks inherit it (saves an import per rank)
from megatron_staged.data import build_tokenizer, build_gpt_datasets, build_data_iterator
import megatron.core.datasets.gpt_dataset

def work(rank, prefix, model, cache, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tok = build_tokenizer("GPTSentencePieceTokenizer", model)
    train, valid, _ = build_gpt_datasets(
        data_path=[prefix], split="3,1,0", mock_data=False, seq_length=16, seed=9,
        tokenizer=tok, train_samples=64, valid_samples=4, test_samples=0, cache_path=cache)
    batch = next(build_data_iterator(train, 0, 2, rank, 2))["tokens"]
    gathered = [torch.zeros_like(batch) for _ in range(2)]
    dist.all_gather(gathered, batch)
    ref = torch.stack([train[i]["tokens"] for i in range(4)])
    assert torch.equal(torch.cat(gathered), ref), "DP ranks do not partition the global batch"
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.start_processes(work, args=tuple(sys.argv[1:4]) + (int(sys.argv[4]),), nprocs=2,
                       start_method="fork")
    print("DIST-OK")
"""


def test_datasets_under_torch_distributed(indexed, sp_model, tmp_path):
    import socket

    prefix, _ = indexed
    script = tmp_path / "dist_data.py"
    script.write_text(textwrap.dedent(_DIST_SCRIPT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), prefix, sp_model,
                           str(tmp_path / "cache"), str(port)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0 and "DIST-OK" in proc.stdout, proc.stderr[-3000:]
    assert any(f.endswith("GPTDataset-train-shuffle_index.npy")
               for _, _, fs in os.walk(tmp_path / "cache") for f in fs)


def test_preprocess_jsonl_values_that_are_not_plain_strings(tmp_path, sp_model, sp_tok):
    """Found as a new user: {"text": 5} and {"text": null} were tokenized as the text "5" and "None",
    and a lone surrogate ("\\ud800", valid JSON) crashed sentencepiece with a pybind11 traceback."""
    jsonl = tmp_path / "v.jsonl"
    jsonl.write_text('{"text": "alpha"}\n{"text": null}\n{"text": "beta \\ud800 gamma"}\n')
    stats = preprocess_data(str(jsonl), str(tmp_path / "v"), "GPTSentencePieceTokenizer", sp_model,
                            append_eod=True, log=lambda m: None)
    assert stats["skipped_empty"]["text"] == 1  # null is an empty document, not "None"
    assert _read_docs(stats["prefixes"]["text"]) == [sp_tok.tokenize("alpha") + [2],
                                                     sp_tok.tokenize("beta \N{REPLACEMENT CHARACTER} gamma") + [2]]
    for value, kind in (("5", "number"), ("[\"a\"]", "array"), ("true", "boolean")):
        jsonl.write_text('{"text": "ok"}\n{"text": %s}\n' % value)
        with pytest.raises(UserError, match=rf"v.jsonl:2 has a JSON {kind} under key 'text', not a string"):
            preprocess_data(str(jsonl), str(tmp_path / "w"), "GPTSentencePieceTokenizer", sp_model)


def test_splits_without_a_share(indexed, sp_tok, sp_model, tmp_path):
    """Found as a new user: `--split 0,100,0` (no train share) and `--split 100,0,0 --eval-interval 1`
    (no validation share) both ended in `TypeError: 'NoneType' object is not an iterator`. No train
    data is one error line; no validation data means no evaluation (Megatron-LM), said in a note."""
    from conftest import run_cli

    prefix, _ = indexed
    with pytest.raises(UserError, match=r"no training data: --split 0,100,0 gives the train split no share"):
        build_gpt_datasets(data_path=[prefix], split="0,100,0", mock_data=False, seq_length=16, seed=1,
                           tokenizer=sp_tok, train_samples=10, valid_samples=1, test_samples=0,
                           cache_path=str(tmp_path))
    train, valid, _ = build_gpt_datasets(data_path=[prefix], split="100,0,0", mock_data=False, seq_length=16,
                                         seed=1, tokenizer=sp_tok, train_samples=10, valid_samples=1,
                                         test_samples=0, cache_path=str(tmp_path))
    assert train is not None and valid is None
    flags = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--eval-iters", "1", "--log-interval", "1",
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model,
             "--data-path", prefix, "--split", "100,0,0", "--progress-bar", "off"]
    r = run_cli(["train", *flags, "--train-iters", "2", "--eval-interval", "1", "--save", str(tmp_path / "ck")],
                timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sum("lm loss:" in l for l in r.stdout.splitlines()) == 2 and "validation loss" not in r.stdout
    assert "note: no validation data" in r.stdout
    r = run_cli(["evaluate", *flags, "--load", str(tmp_path / "ck")], timeout=300, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: no validation data"), r.stderr


def test_train_tokenizer_bad_input_found_while_training_is_one_line(tmp_path, capsys):
    """Found as a new user: a JSONL line after the first lacking --json-keys (or a non-string value)
    surfaced from inside sentencepiece's trainer: 'sentencepiece training failed: INTERNAL: UserError:
    ...' followed by pybind11's 'At:' traceback. It is the input's one error line now; a negative
    --input-sentence-size was a ValueError traceback."""
    from megatron_staged.data.train_tokenizer import main

    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": _stdlib_text("fnmatch.py")}) + "\n" + json.dumps({"body": "x"}) + "\n")
    assert main(["--input", str(src), "--model-prefix", str(tmp_path / "m"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --input: {src}:2 has no key(s) ['text'] (present: ['body']); set --json-keys"], err
    src.write_text(json.dumps({"text": "some text here"}) + "\n")
    assert main(["--input", str(src), "--model-prefix", str(tmp_path / "m"), "--vocab-size", "300",
                 "--input-sentence-size", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --input-sentence-size -1 must be >= 0 (0: every line)"]


def test_tool_errors_quoting_library_messages_are_one_line(tmp_path, capsys):
    """Found as a new user: preprocess_data.py with --tokenizer-type HuggingFaceTokenizer on a directory
    without a tokenizer printed transformers' 5-line message after 'error:'; the tools now fold messages
    to one line as the megatron-staged CLI does."""
    from megatron_staged.data.preprocess import main

    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "no_tok").mkdir()
    assert main(["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "no_tok")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: --tokenizer-model: cannot load a HuggingFace tokenizer"), err


def _numpy_docs(prefix):
    """Documents read with numpy from megatron-core's documented MMIDIDX layout (no megatron code)."""
    import struct

    import numpy

    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    _, code, n, _ = struct.unpack("<QBQQ", raw[9:34])
    dtype = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
             6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}[code]
    lengths = numpy.frombuffer(raw, numpy.int32, n, 34)
    pointers = numpy.frombuffer(raw, numpy.int64, n, 34 + 4 * n)
    data = open(prefix + ".bin", "rb").read()
    return [numpy.frombuffer(data, dtype, int(ln), int(pt)).tolist() for ln, pt in zip(lengths, pointers)]


def test_preprocess_compressed_non_utf8_and_existing_output(tmp_path, sp_model):
    """Found as a new user: a .jsonl.gz was tokenized as text (its compressed bytes); a JSONL line
    with a Latin-1 byte crashed with a UnicodeDecodeError traceback; re-running onto an existing
    --output-prefix silently replaced the dataset."""
    import gzip

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    texts = ["def compressed(x): return x", "import heapq as h"]
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9 bar"}\n')
    out = preprocess_data([str(tmp_path / "d.jsonl.gz"), str(tmp_path / "latin1.jsonl")], str(tmp_path / "o"),
                          "GPTSentencePieceTokenizer", sp_model)
    prefix = out["prefixes"]["text"]
    expected = [sp.encode(t) for t in texts + ["caf\ufffd bar"]]
    assert _numpy_docs(prefix) == expected
    before = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}
    (tmp_path / "other.txt").write_text("something else entirely")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        preprocess_data(str(tmp_path / "other.txt"), str(tmp_path / "o"), "GPTSentencePieceTokenizer", sp_model)
    assert {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")} == before
    preprocess_data(str(tmp_path / "other.txt"), str(tmp_path / "o"), "GPTSentencePieceTokenizer", sp_model,
                    overwrite=True)
    assert _numpy_docs(prefix) == [sp.encode("something else entirely")]
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "d.jsonl.gz").read_bytes()[:20])
    with pytest.raises(UserError, match="cannot read .*cut.jsonl.gz"):
        preprocess_data(str(tmp_path / "cut.jsonl.gz"), str(tmp_path / "c"), "GPTSentencePieceTokenizer", sp_model)


def test_token_ids_outside_the_model_vocabulary_are_a_user_error(indexed, sp_tok, tmp_path):
    """Found as a new user: data preprocessed with a bigger tokenizer than the run's (e.g.
    --tokenizer-type NullTokenizer --vocab-size 64 on sentencepiece data) died in the embedding with
    IndexError: index out of range (a device-side assert on GPU)."""
    prefix, _ = indexed
    train, _, _ = build_gpt_datasets(data_path=[prefix], split="3,1,0", mock_data=False, seq_length=16, seed=5,
                                     tokenizer=sp_tok, train_samples=40, valid_samples=1, test_samples=0,
                                     cache_path=str(tmp_path / "cache"))
    docs = _numpy_docs(prefix)
    top = max(t for d in set(numpy.asarray(train.document_index).tolist()) for t in docs[d])
    n_batches = len(train) // 4
    it = build_data_iterator(train, 0, 4, 0, 1, vocab_size=top + 1)
    for _ in range(n_batches):  # every id fits: no error
        next(it)
    it = build_data_iterator(train, 0, 4, 0, 1, vocab_size=top)
    with pytest.raises(UserError, match=rf"holds token id {top}, outside the model's vocabulary of {top}"):
        for _ in range(n_batches):
            next(it)


def test_train_tokenizer_refuses_to_replace_an_existing_model(tmp_path, capsys):
    """Found as a new user: re-running train_tokenizer.py with the same --model-prefix silently replaced
    the tokenizer that existing .bin/.idx datasets were tokenized with."""
    import sentencepiece

    from megatron_staged.data.train_tokenizer import main

    (tmp_path / "t.txt").write_text(_stdlib_text("fnmatch.py"))
    args = ["--input", str(tmp_path / "t.txt"), "--model-prefix", str(tmp_path / "m")]
    assert main(args + ["--vocab-size", "400"]) == 0
    before = (tmp_path / "m.model").read_bytes()
    capsys.readouterr()
    assert main(args + ["--vocab-size", "420"]) == 2
    assert "m.model already exists" in capsys.readouterr().err
    assert (tmp_path / "m.model").read_bytes() == before
    assert main(args + ["--vocab-size", "420", "--overwrite"]) == 0
    assert sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model")).vocab_size() == 420


def test_preprocess_byte_order_mark_and_json_array(tmp_path, sp_model):
    """Found as a new user: a JSONL saved by a Windows editor (UTF-8 BOM, CRLF) was refused as
    'not valid JSON'; a plain-text file's BOM became three byte-fallback tokens of its first document;
    a .json holding one JSON array got no hint that JSON lines are expected."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    (tmp_path / "w.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "def f(): pass"}\r\n{"text": "x = 1"}\r\n')
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbfimport heapq")
    out = preprocess_data([str(tmp_path / "w.jsonl"), str(tmp_path / "w.txt")], str(tmp_path / "o"),
                          "GPTSentencePieceTokenizer", sp_model)
    assert _numpy_docs(out["prefixes"]["text"]) == [sp.encode(t) for t in ("def f(): pass", "x = 1", "import heapq")]
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    with pytest.raises(UserError, match=r"a.json:1 is not valid JSON .*one JSON array.*jq -c"):
        preprocess_data(str(tmp_path / "a.json"), str(tmp_path / "a"), "GPTSentencePieceTokenizer", sp_model)


@pytest.mark.parametrize("how", ["valid-data-path", "per-split-data-args-path", "data-args-path"])
def test_per_split_and_data_args_blends_are_checked_before_the_run(indexed, tmp_path, how):
    """Found as a new user: a truncated .bin given by --valid-data-path (or in a --per-split-data-args-path /
    --data-args-path file) passed the pre-run checks and crashed at the first evaluation with numpy's
    'offset must be non-negative and no greater than buffer length'."""
    import shutil

    from megatron_staged.config import DataConfig
    from megatron_staged.data.validate import check_data_flags

    prefix, _ = indexed
    cut = str(tmp_path / "cut")
    shutil.copy(prefix + ".idx", cut + ".idx")
    with open(prefix + ".bin", "rb") as f:
        (tmp_path / "cut.bin").write_bytes(f.read(os.path.getsize(prefix + ".bin") // 2))
    d = DataConfig()
    if how == "valid-data-path":
        d.train_data_path, d.valid_data_path = [prefix], [cut]
    elif how == "per-split-data-args-path":
        (tmp_path / "s.json").write_text(json.dumps({"train": [prefix], "test": ["1", cut]}))
        d.per_split_data_args_path = str(tmp_path / "s.json")
    else:
        (tmp_path / "b.txt").write_text(f"0.5 {prefix}\n0.5 {cut}\n")
        d.data_args_path = str(tmp_path / "b.txt")
    with pytest.raises(UserError, match=r"cut.bin does not match .*cut.idx"):
        check_data_flags(d)



def test_preprocess_refuses_binary_files(tmp_path, sp_model):
    """Found as a new user: a binary input (a parquet file, a .zst archive) was tokenized as plain text
    without a word."""
    # the first bytes of a parquet file (magic, then thrift-encoded page headers with NULs)
    (tmp_path / "p.parquet").write_bytes(b"PAR1\x15\x04\x15\x1c\x00\x00\x00hello world\x00\x00PAR1")
    for per_line in (False, True):
        with pytest.raises(UserError, match=r"p.parquet holds NUL bytes: it is a binary file"):
            preprocess_data(str(tmp_path / "p.parquet"), str(tmp_path / "o"), "GPTSentencePieceTokenizer", sp_model,
                            text_document_per_line=per_line)
    assert not list(tmp_path.glob("o_*"))


def test_preprocess_input_directory_skips_datasets_written_into_it(tmp_path, sp_model):
    """Found as a new user: --input data/ --output-prefix data/corpus, run a second time (another key,
    tokenizer or prefix), read the first run's .bin/.idx as text documents."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "import bisect"}) + "\n")
    preprocess_data(str(tmp_path), str(tmp_path / "a"), "GPTSentencePieceTokenizer", sp_model)
    out = preprocess_data(str(tmp_path), str(tmp_path / "b"), "GPTSentencePieceTokenizer", sp_model)
    assert out["num_documents"]["text"] == 1
    assert _numpy_docs(out["prefixes"]["text"]) == [sp.encode("import bisect")]


def test_data_path_given_the_output_prefix_names_the_dataset(indexed, tmp_path):
    """Found as a new user: --data-path out/corpus (the --output-prefix) instead of
    out/corpus_text_document said only 'no indexed dataset at out/corpus'."""
    import shutil

    from megatron_staged.data.validate import check_indexed_dataset

    prefix, _ = indexed
    for suffix in (".bin", ".idx"):  # Megatron-LM's naming: <output-prefix>_<json key>_document
        shutil.copy(prefix + suffix, str(tmp_path / "corpus_text_document") + suffix)
    with pytest.raises(UserError, match=r"no indexed dataset at .*corpus \(.*which wrote .*corpus_text_document "):
        check_indexed_dataset(str(tmp_path / "corpus"))
    with pytest.raises(UserError, match=r"which wrote .*corpus_text_document "):
        build_gpt_datasets(data_path=[str(tmp_path / "corpus")], split="1,0,0", mock_data=False, seq_length=8,
                           seed=1, tokenizer=build_tokenizer("NullTokenizer", vocab_size=10), train_samples=1,
                           valid_samples=0, test_samples=0)


def test_valid_only_data_for_evaluate(indexed, sp_tok, tmp_path):
    """Found as a new user: `evaluate --load CKPT --valid-data-path P` (its own error hint says to give
    --valid-data-path) was refused with 'no training data' (train refuses it in Trainer.train())."""
    prefix, _ = indexed
    kw = dict(data_path=None, split=None, mock_data=False, seq_length=16, seed=1, tokenizer=sp_tok,
              train_samples=8, valid_samples=4, test_samples=0, valid_data_path=[prefix],
              cache_path=str(tmp_path / "c"))
    with pytest.raises(UserError, match="no training data"):
        build_gpt_datasets(**kw)
    train, valid, test = build_gpt_datasets(**kw, require_train=False)
    assert train is None and test is None
    docs = _numpy_docs(prefix)  # the valid split is the whole dataset: its first sample is its first tokens
    stream = [t for d in numpy.asarray(valid.document_index).tolist() for t in docs[d]]
    assert valid[0]["tokens"].tolist() in [stream[i:i + 16] for i in range(len(stream) - 15)]
