"""Megatron-LM compatibility (issue 13): flags, defaults, tokenizers, LR schedule, launch scripts.

Oracles are written from Megatron-LM's source (core_v0.16.1), not from this project's code:
the launch lines are NVIDIA's, the LR formula is OptimizerParamScheduler's sample-based cosine,
the SwiGLU and vocabulary rounding are arguments.py/tokenizer.py's formulas, and GPT-2 BPE is
checked against HuggingFace's two independent implementations.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import subprocess

import pytest
import torch

from conftest import ROOT, _env, free_port
from megatron_staged.config import (MEGATRON_COMPAT, FIELDS, Config, lr_schedule_steps, megatron_lm_flags,
                                    pad_vocab_size, parse_config, require_data_source, resolve_model,
                                    validate)
from megatron_staged.errors import UserError

# NVIDIA's argument lists, as the shell expands them (examples/gpt3/train_gpt3_175b_distributed.sh and
# examples/llama/train_llama3_8b_h100_fp8.sh at core_v0.16.1; paths substituted, the Llama one with
# its default MOCK data, word-split exactly as `${DATA_ARGS_LIST[@]}` unquoted does).
GPT3_175B = """
--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048
--attention-backend auto
--micro-batch-size 1 --global-batch-size 1536 --rampup-batch-size 16 16 5859375 --train-iters 500000
--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16
--lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16
--data-path /data/gpt_text_document --vocab-file /data/gpt2-vocab.json --merge-file /data/gpt2-merges.txt
--split 949,50,1
--log-interval 100 --save-interval 10000 --eval-interval 1000 --save /ckpt --load /ckpt --eval-iters 10
--tensorboard-dir /tb
"""
LLAMA3_8B = """
--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
--group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192 --max-position-embeddings 8192
--position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0
--hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p
--untie-embeddings-and-output-weights --disable-bias-linear
--micro-batch-size 1 --global-batch-size 128 --train-samples 1953125000 --lr-decay-samples 1949218748
--lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5
--lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16
--grad-reduce-in-bf16 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc
--empty-unused-memory-level 1 --exit-duration-in-mins 235
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-param-gather
--tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel
--mock-data --tokenizer-type NullTokenizer --vocab-size 128256 --data-cache-path /cache --tiktoken-pattern v2
--split '99,1,0' --no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1
--log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput --profile
--profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60
--save /ckpt --load /ckpt --tensorboard-dir /tb
"""

# what each script asks for that is refused here (each with its reason in docs/megatron_compat.md)
GPT3_REFUSED = {"--rampup-batch-size"}
LLAMA3_REFUSED = {"--apply-layernorm-1p", "--decoupled-lr", "--decoupled-min-lr", "--grad-reduce-in-bf16",
                  "--calculate-per-token-loss", "--fp8-format", "--fp8-amax-history-len",
                  "--fp8-amax-compute-algo", "--fp8-param-gather", "--profile", "--profile-step-start",
                  "--profile-step-end", "--exit-duration-in-mins"}


def _drop(argv: list[str], flags: set[str]) -> list[str]:
    """argv without ``flags`` and their values (values never start with --)."""
    out, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a in flags
        if not skip:
            out.append(a)
    return out


@pytest.mark.parametrize("script,refused", [(GPT3_175B, GPT3_REFUSED), (LLAMA3_8B, LLAMA3_REFUSED)],
                         ids=["gpt3_175b", "llama3_8b"])
def test_nvidia_launch_lines_parse(script, refused):
    """Every flag parses; the refusals are exactly the expected ones, in one line with reasons."""
    argv = shlex.split(script.replace("'", "\\'"))  # keep the literal quotes the shell leaves
    refused = {f for f in refused if f.lstrip("-").replace("-", "_") not in FIELDS}  # some become fields later
    with pytest.raises(UserError) as err:
        parse_config(argv)
    msg = str(err.value)
    assert "\n" not in msg and "unrecognized" not in msg
    named = {f for f in re.findall(r"--[a-z0-9-]+", msg) if f in argv}
    assert refused <= named, (refused - named, msg)
    # nothing else is refused: without the refused flags the line parses and validates
    rest = _drop(argv, refused)
    cfg = parse_config(rest)
    assert not ({f for f in rest if f.startswith("--")} & refused)
    m, t, o, d = cfg.model, cfg.training, cfg.optim, cfg.data
    if script is GPT3_175B:
        assert (m.num_layers, m.hidden_size, m.fp16, o.lr_warmup_fraction, o.lr_decay_iters) == \
            (96, 12288, True, 0.001, 430000)
        assert (d.vocab_file, d.merge_file, d.split) == ("/data/gpt2-vocab.json", "/data/gpt2-merges.txt", "949,50,1")
        steps = lr_schedule_steps(_validated(cfg, world=8 * 16))
        assert steps["warmup"] == pytest.approx(0.001 * 430000) and steps["decay"] == 430000
    else:
        assert (m.ffn_hidden_size, m.kv_channels, m.rotary_base, m.rotary_percent, m.num_query_groups) == \
            (14336, 128, 1000000, 1.0, 8)
        assert (t.train_samples, o.lr_decay_samples, o.lr_warmup_samples) == (1953125000, 1949218748, 3906252)
        assert cfg.logging.log_throughput and cfg.checkpoint.ckpt_format == "torch_dist"
        cfg.parallel.sequence_parallel = False
        _validated(cfg, world=8)
        assert t.train_iters == 1953125000 // 128  # Megatron: train_samples // global batch


def _validated(cfg: Config, world: int) -> Config:
    cfg.checkpoint.load = None  # the paths in the launch lines do not exist here
    validate(cfg, world)
    return cfg


def test_every_megatron_flag_is_handled():
    """Every Megatron-LM pretraining flag is a field of the tree, or in the table, or refused by name."""
    flags = megatron_lm_flags()
    assert len(flags) > 600  # the whole parser of core_v0.16.1
    fields = {"--" + k.replace("_", "-") for k in FIELDS} | {"--no-" + k.replace("_", "-") for k in FIELDS}
    unknown = [f for f in flags if f not in fields and f not in MEGATRON_COMPAT and f != "--help"]
    # a sample of unhandled flags: each is refused with the generic line naming its Megatron group
    for flag in unknown[::40]:
        nargs = flags[flag][0]
        argv = ["--mock-data", flag] + (["1"] if nargs in ("1", "?") else ["1"] * int(nargs) if nargs.isdigit() else [])
        with pytest.raises(UserError, match=re.escape(flag) + r" \(Megatron-LM '.*' option\) is not supported"):
            parse_config(argv)
    for flag, rule in MEGATRON_COMPAT.items():
        assert rule.action in ("set", "accept", "refuse") and (rule.reason or rule.action == "set"), flag


def test_compat_rules_set_accept_refuse(capsys):
    cfg = parse_config(["--mock-data", "--no-rope-fusion", "--use-rotary-position-embeddings", "--use-dist-ckpt",
                        "--no-masked-softmax-fusion", "--attention-softmax-in-fp32", "--context-parallel-size", "1",
                        "--use-mcore-models", "--split", "'99,1,0'"])
    assert (cfg.model.apply_rope_fusion, cfg.model.position_embedding_type, cfg.model.masked_softmax_fusion,
            cfg.model.attention_softmax_in_fp32) == (False, "rope", False, True)
    assert "note: --use-mcore-models accepted" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^--context-parallel-size 2: context parallelism"):
        parse_config(["--mock-data", "--context-parallel-size", "2"])
    # interleaved 1F1B parses with Megatron-LM's meaning (tests/test_virtual_pipeline.py runs it)
    cfg = parse_config(["--mock-data", "--num-layers-per-virtual-pipeline-stage", "2", "--no-overlap-p2p-communication"])
    assert (cfg.parallel.num_layers_per_virtual_pipeline_stage, cfg.parallel.overlap_p2p_comm) == (2, False)
    with pytest.raises(UserError, match="--ckpt-format torch: only torch_dist"):
        validate(parse_config(["--mock-data", "--ckpt-format", "torch"]), 1)
    with pytest.raises(UserError, match="no training data: give --data-path"):
        require_data_source(parse_config([]).data)
    validate(parse_config(["--builtin-corpus"]), 1)
    with pytest.raises(UserError, match="exclusive"):
        validate(parse_config(["--mock-data", "--train-samples", "64", "--train-iters", "3"]), 1)
    with pytest.raises(UserError, match="need sample-based training"):
        validate(parse_config(["--mock-data", "--lr-warmup-samples", "64"]), 1)
    with pytest.raises(UserError, match="one of --lr-warmup-fraction"):
        validate(parse_config(["--mock-data", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"]), 1)
    with pytest.raises(UserError, match="no checkpoint there"):
        validate(parse_config(["--mock-data", "--load", "/nonexistent/x", "--exit-on-missing-checkpoint"]), 1)


def test_more_megatron_spellings_data_args_files_and_dataloader(tmp_path, capsys):
    cfg = parse_config(["--mock-data", "--recompute-activations", "--override-opt_param-scheduler",
                        "--dataloader-type", "single", "--num-dataset-builder-threads", "4",
                        "--ckpt-assume-constant-structure"])
    assert cfg.performance.recompute_granularity == "selective" and cfg.checkpoint.override_opt_param_scheduler
    out = capsys.readouterr().out  # (--dataloader-type single is what runs here: no note)
    assert "note: --num-dataset-builder-threads accepted" in out and "note: --ckpt-assume-constant-structure" in out
    with pytest.raises(UserError, match=r"^--dataloader-type cyclic: the data order is Megatron-LM's default"):
        parse_config(["--mock-data", "--dataloader-type", "cyclic"])
    # --data-args-path: the blend in a file; --per-split-data-args-path: per-split blends in JSON
    (tmp_path / "blend.txt").write_text("0.3 /data/web_text_document\n0.7 /data/code_text_document\n")
    cfg = parse_config(["--data-args-path", str(tmp_path / "blend.txt"), "--tokenizer-type", "NullTokenizer"])
    validate(cfg, 1)
    assert cfg.data.data_path == ["0.3", "/data/web_text_document", "0.7", "/data/code_text_document"]
    (tmp_path / "splits.json").write_text('{"train": ["1", "/data/a"], "valid": "/data/b", "test": []}')
    cfg = parse_config(["--per-split-data-args-path", str(tmp_path / "splits.json"), "--tokenizer-type", "NullTokenizer"])
    validate(cfg, 1)
    assert (cfg.data.train_data_path, cfg.data.valid_data_path, cfg.data.test_data_path) == (["1", "/data/a"], ["/data/b"], [])
    for argv, message in ((["--data-args-path", str(tmp_path / "nope.txt")], "no such file"),
                          (["--data-args-path", str(tmp_path / "blend.txt"), "--data-path", "x"], "replaces --data-path"),
                          (["--per-split-data-args-path", str(tmp_path / "blend.txt")], "not JSON")):
        with pytest.raises(UserError, match=message):
            validate(parse_config(["--tokenizer-type", "NullTokenizer", *argv]), 1)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_increment_is_megatrons(style):
    """--weight-decay-incr-style linear/cosine from --start- to --end-weight-decay over --train-iters, on the
    optimizer's param groups (Megatron-LM's OptimizerParamScheduler.get_wd, written out here)."""
    import torch

    from megatron_staged.training.lr import build_scheduler

    cfg = parse_config(["--mock-data", "--train-iters", "10", "--weight-decay-incr-style", style,
                        "--start-weight-decay", "0.01", "--end-weight-decay", "0.11"])
    validate(cfg, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = build_scheduler(opt, cfg.optim, cfg.training.train_iters)
    for k in range(1, 13):
        sched.step(1)
        r = min(k, 10) / 10
        coeff = r if style == "linear" else 0.5 * (math.cos(math.pi * (1 - r)) + 1.0)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01 + coeff * 0.1, abs=1e-12), k
    with pytest.raises(UserError, match="needs --start-weight-decay and --end-weight-decay"):
        validate(parse_config(["--mock-data", "--weight-decay-incr-style", "linear"]), 1)
    with pytest.raises(UserError, match="not above --end-weight-decay"):
        validate(parse_config(["--mock-data", "--weight-decay-incr-style", style, "--start-weight-decay", "0.2",
                               "--end-weight-decay", "0.1"]), 1)
    with pytest.raises(UserError, match="need --weight-decay-incr-style linear or cosine"):
        validate(parse_config(["--mock-data", "--start-weight-decay", "0.2"]), 1)


def _megatron_lr(samples: int, *, max_lr, min_lr, warmup, decay, style="cosine") -> float:
    """OptimizerParamScheduler.get_lr at ``samples`` consumed samples (Megatron-LM's sample-based steps)."""
    if warmup > 0 and samples <= warmup:
        return max_lr * samples / warmup
    if samples > decay:
        return min_lr
    ratio = (samples - warmup) / (decay - warmup)
    coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if style == "cosine" else 1.0 - ratio
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.parametrize("flags,warmup_samples", [
    (["--lr-warmup-samples", "40"], 40),
    (["--lr-warmup-fraction", "0.15"], None),
])
@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_sample_based_schedule_matches_megatron(flags, warmup_samples, style):
    import torch

    from megatron_staged.training.lr import build_scheduler

    gbs, train_samples, decay_samples = 12, 1000, 900
    cfg = parse_config(["--mock-data", "--global-batch-size", "12", "--micro-batch-size", "12", "--train-samples",
                        str(train_samples), "--lr-decay-samples", str(decay_samples), "--lr", "1e-3",
                        "--min-lr", "1e-4", "--lr-decay-style", style, *flags])
    validate(cfg, 1)
    assert cfg.training.train_iters == train_samples // gbs
    warmup = warmup_samples if warmup_samples is not None else 0.15 * decay_samples
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(opt, cfg.optim, cfg.training.train_iters, steps=lr_schedule_steps(cfg))
    for it in range(1, cfg.training.train_iters + 1):
        sched.step(increment=1)
        want = _megatron_lr(it * gbs, max_lr=1e-3, min_lr=1e-4, warmup=warmup, decay=decay_samples, style=style)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), it


def test_megatron_defaults_swiglu_and_vocab_padding():
    for hidden in (64, 128, 1000, 4096, 8192):
        cfg = Config()
        cfg.model.model_family, cfg.model.hidden_size, cfg.model.num_attention_heads = "llama", hidden, 8
        assert resolve_model(cfg.model).ffn_hidden_size == int((4 * hidden * 2 / 3) / 64) * 64  # arguments.py
    # tokenizer.py _vocab_size_with_padding: a multiple of make_vocab_size_divisible_by * TP
    for vocab, tp, want in ((50257, 1, 50304), (50257, 2, 50432), (50257, 8, 51200), (32000, 4, 32256)):
        assert pad_vocab_size(vocab, 128, tp) == want
        assert pad_vocab_size(vocab, 128, tp, "lcm") == pad_vocab_size(vocab, 128, 1, "lcm")
    assert parse_config([]).model.vocab_padding == "megatron"


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("bpe")
    texts = [p.read_text() for p in sorted((ROOT / "megatron_staged").rglob("*.py"))[:20]]
    src = d / "train.txt"
    src.write_text("\n".join(texts))
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train([str(src)], vocab_size=700, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(d))
    return str(d / "vocab.json"), str(d / "merges.txt"), "\n".join(texts)


def test_gpt2_bpe_tokenizer_matches_huggingface(bpe_files):
    from tokenizers import ByteLevelBPETokenizer

    from megatron_staged.data.tokenizer import build_tokenizer

    vocab, merges, text = bpe_files
    mine = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    ref = ByteLevelBPETokenizer(vocab, merges)
    sample = text[:20000] + " héllo wörld, 日本語 \t\n  x  's they're 12345 ... !!"
    assert mine.tokenize(sample) == ref.encode(sample).ids
    assert mine.detokenize(mine.tokenize(sample)) == sample
    assert (mine.vocab_size, mine.eod) == (ref.get_vocab_size(), ref.token_to_id("<|endoftext|>"))
    with pytest.raises(UserError, match="--merge-file is required"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)


def test_sentencepiece_family(tmp_path):
    from megatron_staged.data import train_sentencepiece_from_texts
    from megatron_staged.data.tokenizer import build_tokenizer

    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(300)]
    model = train_sentencepiece_from_texts(texts, str(tmp_path / "sp"), vocab_size=300)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    text = "the lazy fox 42"
    gpt = build_tokenizer("GPTSentencePieceTokenizer", model)
    llama = build_tokenizer("Llama2Tokenizer", model)
    assert gpt.tokenize(text) == sp.encode_as_ids(text) and gpt.eod == sp.eos_id()
    assert llama.tokenize(text) == [sp.bos_id()] + sp.encode_as_ids(text) and llama.eod == sp.eos_id()
    assert gpt.vocab_size == llama.vocab_size == sp.get_piece_size()
    # Megatron-LM's _SentencePieceTokenizer: <CLS> <SEP> <EOD> <MASK> appended after the model's pieces;
    # pad/bos/eos are the model's own pieces when it defines them; EOD is <EOD>; specials in text split it
    meg = build_tokenizer("SentencePieceTokenizer", model)
    v = sp.get_piece_size()
    assert min(sp.pad_id(), sp.bos_id(), sp.eos_id()) >= 0  # train_sentencepiece defines all three
    assert (meg.cls, meg.sep, meg.eod, meg.mask) == (v, v + 1, v + 2, v + 3) and meg.vocab_size == v + 4
    assert (meg.pad, meg.bos, meg.eos) == (sp.pad_id(), sp.bos_id(), sp.eos_id())
    assert meg.tokenize("the fox<EOD> lazy <SEP>dog") == \
        sp.encode_as_ids("the fox") + [v + 2] + sp.encode_as_ids(" lazy ") + [v + 1] + sp.encode_as_ids("dog")
    assert meg.tokenize(text) == sp.encode_as_ids(text)
    assert meg.detokenize(sp.encode_as_ids("the fox") + [v + 3]) == sp.decode_ids(sp.encode_as_ids("the fox")) + " <MASK> "
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the tiktoken package"):
            build_tokenizer("TikTokenizer", model)


def test_preprocess_gpt2_bpe_megatron_flags(bpe_files, tmp_path):
    vocab, merges, text = bpe_files
    docs = tmp_path / "docs.jsonl"
    import json

    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in text.split("\n\n")[:60] if t.strip()))
    r = subprocess.run([os.sys.executable, "tools/preprocess_data.py", "--input", str(docs), "--output-prefix",
                        str(tmp_path / "bpe"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                        "--merge-file", merges, "--append-eod", "--workers", "2", "--partitions", "2",
                        "--log-interval", "20"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"Processed 20 documents \([0-9.e+-]+ docs/s, [0-9.e+-]+ MB/s\)\.", r.stderr), r.stderr
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_staged.data.tokenizer import build_tokenizer

    ds = IndexedDataset(str(tmp_path / "bpe_text_document"))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    first = json.loads(docs.read_text().splitlines()[0])["text"]
    assert list(ds[0]) == tok.tokenize(first) + [tok.eod]
    r = subprocess.run([os.sys.executable, "tools/preprocess_data.py", "--input", str(docs), "--output-prefix",
                        str(tmp_path / "s"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                        "--merge-file", merges, "--split-sentences"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--split-sentences" in r.stderr


def _run_script(script: str, args: list[str], env: dict, timeout=600) -> subprocess.CompletedProcess:
    e = _env({**env, "MASTER_PORT": str(free_port()), "GPUS_PER_NODE": "1"})
    return subprocess.run(["bash", str(ROOT / "examples" / "megatron_scripts" / script), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


MEGATRON_LOG_LINE = re.compile(
    r" \[[0-9-]+ [0-9:.]+\] iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| elapsed time per iteration "
    r"\(ms\): [0-9.]+ \|( throughput per GPU \(TFLOP/s/GPU\): [0-9.]+ \|)? learning rate: ([0-9.E+-]+) \| "
    r"global batch size: +(\d+) \| lm loss: [0-9.E+-]+ \| loss scale: 1\.0 \| grad norm: [0-9.]+ \| "
    r"number of skipped iterations: +0 \| number of nan iterations: +0 \|")


def test_nvidia_scripts_run_reduced_on_cpu(bpe_files, tmp_path):
    """NVIDIA's launch lines with this entry point, reduced to 2 layers, train and save on CPU."""
    small = dict(NUM_LAYERS="2", HIDDEN_SIZE="64", NUM_HEADS="4", SEQ_LENGTH="32", GLOBAL_BATCH_SIZE="4",
                 EVAL_ITERS="1", PRECISION="", DATA_CACHE_PATH=str(tmp_path / "cache"))
    r = _run_script("train_llama3_8b.sh", [str(tmp_path / "ck"), str(tmp_path / "tb"), "MOCK", "MOCK"],
                    dict(small, FFN_HIDDEN_SIZE="192", NUM_QUERY_GROUPS="2", KV_CHANNELS="16", TRAIN_SAMPLES="12",
                         LR_DECAY_SAMPLES="12", LR_WARMUP_SAMPLES="4", SEQUENCE_PARALLEL="", VOCAB_SIZE="1000",
                         EVAL_INTERVAL="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [MEGATRON_LOG_LINE.search(l) for l in r.stdout.splitlines() if "] iteration" in l]
    assert len(lines) == 3 and all(lines), r.stdout[-3000:]
    # sample-based schedule: warmup 4 samples = 1 iteration, cosine over samples 4..12 (Megatron's formula)
    for m in lines:
        it = int(m.group(1))
        assert m.group(4) and float(m.group(5)) == pytest.approx(
            _megatron_lr(it * 4, max_lr=1.5e-4, min_lr=1e-5, warmup=4, decay=12), rel=1e-6)
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    for tag in ("lm loss", "learning-rate", "batch-size", "loss-scale", "grad-norm", "lm loss vs samples",
                "lm loss validation"):
        assert tag in tags, tags

    vocab, merges, _ = bpe_files
    r = _run_script("train_gpt3_175b_distributed.sh", [str(tmp_path / "g"), str(tmp_path / "gtb"), vocab, merges,
                                                       "MOCK"],
                    dict(small, TRAIN_ITERS="2", LR_DECAY_ITERS="2", TP="1", PP="1", LOG_INTERVAL="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "using GPT2BPETokenizer" in r.stdout
    lines = [MEGATRON_LOG_LINE.search(l) for l in r.stdout.splitlines() if "] iteration" in l]
    assert len(lines) == 2 and all(lines) and not lines[0].group(4)  # no --log-throughput: no throughput field


def test_eval_iters_zero_means_no_evaluation(tmp_path):
    """Found as a new user: `--eval-iters 0` (Megatron-LM's way to turn validation off) was refused as
    'must be positive'. It trains with no validation pass, also at --eval-interval and at a growth."""
    from conftest import run_cli

    (tmp_path / "stages.yaml").write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2}\n")
    r = run_cli(["train", "--config", str(tmp_path / "stages.yaml"), "--num-layers", "1", "--hidden-size", "32",
                 "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
                 "--global-batch-size", "2", "--train-iters", "3", "--mock-data", "--vocab-size", "100",
                 "--eval-iters", "0", "--eval-interval", "1", "--log-interval", "1", "--progress-bar", "off"],
                timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sum(" iteration " in l and "lm loss:" in l for l in r.stdout.splitlines()) == 3, r.stdout[-2000:]
    assert "validation loss" not in r.stdout
    assert "growth at iteration 2" in r.stdout and "eval loss check skipped (--eval-iters 0)" in r.stdout


def test_zero_intervals_mean_off(tmp_path):
    """Megatron-LM's training loop reads --exit-interval, --exit-duration-in-mins, --save-interval and
    --eval-interval as `if args.X and iteration % args.X == 0` (training.py, core_v0.16.1): 0 is off. They
    were refused here as 'must be positive'. With --save, Megatron-LM's validate_args asserts
    save_interval > 0, so that one combination stays an error."""
    from conftest import TINY_MOCK, run_cli

    validate(parse_config(["--mock-data", "--save-interval", "0"]), 1)  # no --save: accepted, nothing saved
    with pytest.raises(UserError, match=r"--save-interval 0 with --save"):
        validate(parse_config(["--mock-data", "--save", str(tmp_path / "x"), "--save-interval", "0"]), 1)
    ck = tmp_path / "ck"
    r = run_cli(["train", *TINY_MOCK, "--train-iters", "3", "--exit-interval", "0", "--exit-duration-in-mins", "0",
                 "--eval-interval", "0", "--save", str(ck)], timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # all off: the run reaches --train-iters (no early exit) and saves only at the end
    assert sum(" iteration " in l and "lm loss:" in l for l in r.stdout.splitlines()) == 3, r.stdout[-2000:]
    assert "exiting at iteration" not in r.stdout
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_0000003"]
    # --eval-interval 0: no periodic validation; only Megatron-LM's final evaluation after training
    assert "validation loss at iteration 3 on validation set" in r.stdout
    assert not re.search(r"validation loss at iteration \d+ \|", r.stdout)


def test_squared_relu_grows_and_exports(tmp_path):
    """--squared-relu is Megatron-LM's activation_func = megatron.core.activations.squared_relu with no
    gated linear unit (arguments.py, core_v0.16.1). Width growth duplicates FFN neurons, which keeps the
    function for any elementwise activation: the eval loss is unchanged across a depth+width growth. The
    grown model exports as transformers' GPT-2 with activation_function relu2 (relu(x)^2), and
    `export-hf --verify` runs transformers' forward against megatron's."""
    import json

    from conftest import TINY_MOCK, read_records, run_cli
    from megatron.core.activations import squared_relu
    from megatron_staged.checkpoint.hf_mapping import arch_from_model_config
    from megatron_staged.model.builder import transformer_config

    cfg = parse_config(["--mock-data", "--model-family", "llama", "--squared-relu"])
    tc = transformer_config(cfg)
    assert tc.activation_func is squared_relu and not tc.gated_linear_unit
    assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size  # Megatron-LM: 4h without --swiglu
    with pytest.raises(UserError, match=r"no transformers architecture"):  # RMSNorm/rope + relu^2: no HF model
        arch_from_model_config(cfg.model, 100)
    with pytest.raises(UserError, match=r"--squared-relu and --swiglu are exclusive"):
        resolve_model(parse_config(["--mock-data", "--squared-relu", "--swiglu"]).model)
    # a Megatron-LM checkpoint's args (attribute squared_relu, as its parser names it) keep the activation
    import argparse

    from megatron_staged.checkpoint.megatron_lm import config_from_megatron_args
    ns = argparse.Namespace(squared_relu=True, swiglu=False, normalization="LayerNorm", num_layers=2, hidden_size=32)
    assert config_from_megatron_args(ns).model.squared_relu

    (tmp_path / "stages.yaml").write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, width_factor: 2}\n")
    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    run_cli(["train", *TINY_MOCK, "--squared-relu", "--train-iters", "3", "--eval-iters", "2",
             "--config", str(tmp_path / "stages.yaml"), "--save", str(ck), "--log-file", str(log)], timeout=300)
    g = [r for r in read_records(log) if r.get("event") == "growth"]
    assert len(g) == 1 and (g[0]["num_layers"], g[0]["hidden_size"]) == (4, 64), g
    assert abs(g[0]["eval_loss_after"] - g[0]["eval_loss_before"]) < 1e-5, g[0]
    r = run_cli(["export-hf", "--load", str(ck), "--out", str(tmp_path / "hf"), "--verify"], timeout=300)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "relu2"
    assert float(r.stdout.split("megatron vs transformers = ")[1].split()[0]) <= 1e-4
    # import-hf reads relu2 back as --squared-relu (and still refuses activations it cannot compute)
    from megatron_staged.checkpoint.hf_mapping import arch_from_hf_config, arch_to_model_fields

    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert arch_to_model_fields(arch_from_hf_config(hf))["squared_relu"] is True
    with pytest.raises(UserError, match=r"activation_function 'relu'"):
        arch_from_hf_config(dict(hf, activation_function="relu"))


def test_rotary_interleaved_grows_and_exports(tmp_path):
    """--rotary-interleaved is megatron-core's rotary_interleaved (Megatron-LM passes it to the
    TransformerConfig): channel pairs (2i, 2i+1) rotate instead of (i, i + d/2). Growth keeps the head
    size (width doubles heads), so the eval loss is unchanged across a depth+width growth. export-hf
    reorders each query/key head (and the QKV bias) to transformers' half layout; `--verify` runs
    transformers' Qwen2 forward against megatron's."""
    import json

    from conftest import TINY_MOCK, read_records, run_cli
    from megatron_staged.checkpoint.hf_mapping import interleaved_to_half
    from megatron_staged.model.builder import transformer_config

    assert transformer_config(parse_config(["--mock-data", "--model-family", "llama",
                                            "--rotary-interleaved"])).rotary_interleaved
    # the permutation, written out for one head of size 4 with 2 columns: rows 0, 2, 1, 3
    t = torch.arange(8.0).reshape(4, 2)
    assert interleaved_to_half(t, 4).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]

    (tmp_path / "stages.yaml").write_text("staging:\n  stages:\n    - {at_iteration: 2, depth_factor: 2, width_factor: 2}\n")
    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    run_cli(["train", *TINY_MOCK, "--model-family", "llama", "--rotary-interleaved", "--add-qkv-bias", "--init-method-std", "0.1",
             "--train-iters", "3", "--eval-iters", "2", "--config", str(tmp_path / "stages.yaml"), "--save", str(ck),
             "--log-file", str(log)], timeout=300)
    g = [r for r in read_records(log) if r.get("event") == "growth"]
    assert len(g) == 1 and (g[0]["num_layers"], g[0]["hidden_size"]) == (4, 64), g
    assert abs(g[0]["eval_loss_after"] - g[0]["eval_loss_before"]) < 1e-5, g[0]
    r = run_cli(["export-hf", "--load", str(ck), "--out", str(tmp_path / "hf"), "--verify"], timeout=300)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert float(r.stdout.split("megatron vs transformers = ")[1].split()[0]) <= 1e-4


GLOO_PROBE = """
import json
from megatron.core import parallel_state as ps
from megatron_staged.builders import build_components
from megatron_staged.config import parse_config, validate
from megatron_staged.model.builder import set_padded_vocab_size
from megatron_staged.runtime.distributed import init_distributed

init_distributed()
out = {}
for extra in ([], ["--disable-gloo-process-groups"]):
    cfg = parse_config(["--mock-data", "--vocab-size", "128", "--num-layers", "1", "--hidden-size", "32",
                        "--num-attention-heads", "2", "--seq-length", "16", "--use-distributed-optimizer", *extra])
    validate(cfg, 1)
    set_padded_vocab_size(cfg, 128)
    c = build_components(cfg)
    try:
        ps.get_data_parallel_group_gloo()
        made = True
    except AssertionError:  # megatron-core: "data parallel group-gloo is not initialized"
        made = False
    out[" ".join(extra)] = [made] + [o.data_parallel_group_gloo is not None for o in c.optimizer.chained_optimizers]
print(json.dumps(out))
"""


def test_disable_gloo_process_groups(tmp_path, capsys):
    """Megatron-LM's --disable-gloo-process-groups (dest enable_gloo_process_groups=False) stops
    megatron-core creating its extra gloo groups (initialize_model_parallel(create_gloo_process_groups=...),
    get_megatron_optimizer(use_gloo_process_groups=...)). It used to get the generic refusal. On CPU the
    backend itself is gloo: honoured with a note. A legacy torch-format distributed-optimizer load needs
    the gloo data-parallel group (Megatron-LM: the flag asserts --use-dist-ckpt): one-line refusal."""
    import json
    import sys
    import types

    from conftest import TINY_MOCK, run_cli
    from megatron_staged.checkpoint.legacy_torch import _load_dist_optim

    cfg = parse_config(["--mock-data", "--disable-gloo-process-groups"])
    assert cfg.parallel.enable_gloo_process_groups is False
    if not torch.cuda.is_available():
        assert "--disable-gloo-process-groups: megatron-core's extra gloo process groups" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-c", GLOO_PROBE], cwd=str(ROOT), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"": [True, True],
                                                              "--disable-gloo-process-groups": [False, False]}
    # training and saving with the distributed optimizer need no gloo group
    r = run_cli(["train", *TINY_MOCK, "--train-iters", "2", "--use-distributed-optimizer",
                 "--disable-gloo-process-groups", "--save", str(tmp_path / "ck")], timeout=300)
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    with pytest.raises(UserError, match=r"--disable-gloo-process-groups does not create") as e:
        _load_dist_optim(str(tmp_path), types.SimpleNamespace(data_parallel_group_gloo=None), 2)
    assert "\n" not in str(e.value)
