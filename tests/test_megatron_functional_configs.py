"""Flags from Megatron-LM's own functional-test configs (tests/functional_tests/test_cases/gpt/*/
model_config.yaml at core_v0.16.1), found by running those configs scaled down on CPU.

Oracles: Megatron-LM's documented meaning of each flag (arguments.py / training.py at core_v0.16.1),
megatron-core's TransformerConfig, hand-computed values, and what a user sees on the terminal.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, _env, free_port
from megatron_staged.config import parse_config
from megatron_staged.errors import UserError


def _launch(script: str, tmp_path, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    path = tmp_path / "launch.py"
    path.write_text(textwrap.dedent(script))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(path)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_error_line_survives_a_slow_rank_0(tmp_path):
    """Found running Megatron-LM's rope_embeddings_interleaved_no_fusion config on a loaded machine: a
    refused flag ended the torchrun job (exit 2) with no error line at all. Every rank raised the same
    error but only rank 0 prints it; the other ranks exited at once, and torchrun stopped rank 0 before
    it printed. Here rank 0 is made slow (3 s) on purpose: the user must still get the one error line.
    (--rotary-interleaved is supported now; --apply-layernorm-1p is a flag still refused by name.)"""
    r = _launch("""
        import os, sys, time
        if os.environ["RANK"] == "0":
            time.sleep(3)
        from megatron_staged.cli import main
        sys.exit(main(["train", "--mock-data", "--apply-layernorm-1p"]))
    """, tmp_path)
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: --apply-layernorm-1p"), r.stderr[-3000:]


def test_error_of_one_rank_only_is_reported(tmp_path):
    """An error raised on rank 1 only (rank 0 busy elsewhere) is printed by rank 1, naming it."""
    r = _launch("""
        import os, sys, time
        from megatron_staged import cli
        from megatron_staged.errors import UserError
        def boom(argv):
            if os.environ["RANK"] == "1":
                raise UserError("only on rank one")
            time.sleep(60)
        cli.COMMANDS["boom"] = boom
        sys.exit(cli.main(["boom"]))
    """, tmp_path)
    assert r.returncode != 0
    assert "error (rank 1): only on rank one" in r.stderr, r.stderr[-3000:]


# MODEL_ARGS of Megatron-LM's gpt3_mcore_te_tp1_pp4_resume_torch_dist_swiglu and ..._sequence_parallel
# (core_v0.16.1), sizes reduced, paths replaced, minus what is refused here (--async-save,
# --use-persistent-ckpt-worker; --distributed-backend nccl and --transformer-impl transformer_engine
# need a GPU)
FUNCTIONAL = """
--num-layers 2 --hidden-size 32 --num-attention-heads 4 --log-params-norm --log-num-zeros-in-grad
--log-validation-ppl-to-tensorboard --log-timers-to-tensorboard --micro-batch-size 2 --global-batch-size 4
--seq-length 16 --max-position-embeddings 16 --train-iters 2 --timing-log-level 0 --lr-decay-iters 320000
--split 949,50,1 --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2 --clip-grad 1.0
--lr-warmup-fraction .01 --log-interval 1 --save-interval 50 --eval-interval 1000 --eval-iters 1
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --swiglu --ckpt-fully-parallel-load
--deterministic-mode --no-gradient-accumulation-fusion --attention-softmax-in-fp32
--use-checkpoint-opt_param-scheduler --use-mcore-models --ckpt-format torch_dist --log-memory-to-tensorboard
--sequence-parallel --dist-ckpt-optim-fully-reshardable --dist-ckpt-strictness log_all
""".split()


def test_functional_config_flags_are_megatrons(capsys):
    """Flags that were refused with the generic 'not supported' line although they are logging switches,
    what this project always does, or megatron-core settings: each now means what it means in Megatron-LM."""
    cfg = parse_config(FUNCTIONAL + ["--mock-data", "--apply-query-key-layer-scaling"])
    out = capsys.readouterr().out
    assert "note: --dist-ckpt-optim-fully-reshardable accepted" in out
    assert cfg.logging.log_num_zeros_in_grad and cfg.logging.log_memory_to_tensorboard
    assert cfg.performance.deterministic_mode and cfg.model.apply_query_key_layer_scaling
    from megatron_staged.config import validate
    from megatron_staged.model.builder import transformer_config

    validate(cfg, 1)
    tc = transformer_config(cfg)
    # Megatron-LM's validate_args: "Disabling sequence parallelism because tensor model parallelism is
    # disabled" -- megatron-core is built without it at TP 1 (no error, as there); the flag stays in the
    # config so that a width growth to TP > 1 turns it on
    assert tc.sequence_parallel is False and cfg.parallel.sequence_parallel is True
    # megatron-core's TransformerConfig: layer scaling forces the fp32 softmax; deterministic_mode passed on
    assert tc.apply_query_key_layer_scaling and tc.attention_softmax_in_fp32 and tc.deterministic_mode
    with pytest.raises(UserError, match="--apply-layernorm-1p"):  # still refused by name
        parse_config(["--mock-data", "--apply-layernorm-1p"])
    # the other switches of NVIDIA's configs: checkpoint strictness, rerun machine off, timers, save spread
    parse_config(["--mock-data", "--rerun-mode", "disabled", "--timing-log-option", "minmax",
                  "--no-ckpt-fully-parallel-save", "--auto-detect-ckpt-format"])
    assert "note: --dist-ckpt-strictness accepted" in out
    # Megatron-LM's default --rerun-mode validate_results re-runs suspicious iterations: not wired, said so
    with pytest.raises(UserError, match=r"^--rerun-mode validate_results: the rerun state machine"):
        parse_config(["--mock-data", "--rerun-mode", "validate_results"])


def _tiny_dataset(prefix: str, period: int) -> None:
    """2000 documents cycling through token ids 1..period (no EOD), written with megatron-core's builder."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for _ in range(2000):
        b.add_document(torch.tensor([1 + i % period for i in range(10 * period)]), [10 * period])
    b.finalize(prefix + ".idx")


def test_num_zeros_in_grad_counts_unused_embedding_rows(tmp_path):
    """--log-num-zeros-in-grad prints Megatron-LM's ' num zeros: N |' after the grad norm. Oracle by hand:
    with untied embeddings, fp32 and every batch holding exactly the ids 1..10, the only zero gradients
    are the word-embedding rows of the other ids: hidden x (padded vocab 128 - 10). (No linear biases:
    the key bias's gradient is zero analytically, softmax being shift-invariant, so some of its elements
    come out exactly 0 by round-off.) And
    --apply-query-key-layer-scaling and --deterministic-mode do not change the losses (Megatron-LM:
    layer scaling is undone in the fp32 softmax)."""
    from conftest import run_cli

    _tiny_dataset(str(tmp_path / "cyc"), 10)
    base = FUNCTIONAL + ["--data-path", str(tmp_path / "cyc"), "--tokenizer-type", "NullTokenizer",
                         "--vocab-size", "100", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                         "--progress-bar", "off",
                         "--data-cache-path", str(tmp_path / "cache"), "--seed", "7"]
    base = [a for a in base if a not in ("--deterministic-mode",)]
    runs = []
    for extra in ([], ["--apply-query-key-layer-scaling", "--deterministic-mode"]):
        r = run_cli(["train", *base, *extra], timeout=300, check=False)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        lines = [l for l in r.stdout.splitlines() if "] iteration" in l]
        assert len(lines) == 2, r.stdout[-3000:]
        for l in lines:
            m = re.search(r"\| grad norm: [0-9.]+ \| num zeros: ([0-9.]+) \| params norm: [0-9.]+ \|", l)
            assert m and float(m.group(1)) == 32 * (128 - 10), l
        runs.append([float(re.search(r"lm loss: ([0-9.E+-]+)", l).group(1)) for l in lines])
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_evaluation_after_training_on_validation_and_test_sets(tmp_path):
    """Megatron-LM's pretrain() evaluates after training (when it ran to --train-iters, not after an
    early exit) on the validation set and then the test set, --eval-iters batches each, printing
    ' validation loss at iteration N on validation set | ...' and '... on test set | ...' between rules
    of dashes. Missing here before: a run with --eval-interval 1000 (NVIDIA's functional configs) and
    100 iterations printed no validation loss at all."""
    from conftest import run_cli

    flags = ["train", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--mock-data", "--vocab-size", "100",
             "--eval-iters", "2", "--log-interval", "1", "--progress-bar", "off", "--train-iters", "2"]
    r = run_cli(flags + ["--eval-interval", "2"], timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    periodic = [l for l in lines if l.startswith(" validation loss at iteration 2 |")]
    final = [i for i, l in enumerate(lines) if l.startswith(" validation loss at iteration 2 on ")]
    assert len(periodic) == 1 and [lines[i].split(" |")[0] for i in final] == [
        " validation loss at iteration 2 on validation set", " validation loss at iteration 2 on test set"], r.stdout
    for i in final:  # Megatron-LM: '-' * (len(line) + 1) above and below
        assert lines[i - 1] == lines[i + 1] == "-" * (len(lines[i]) + 1)
    value = lambda l: float(re.search(r"lm loss value: ([0-9.E+-]+)", l).group(1))
    # same model, same validation batches (each evaluation reads the validation set from its start here)
    assert value(lines[final[0]]) == value(periodic[0])
    r = run_cli(flags + ["--exit-interval", "1"], timeout=300, check=False)  # an early exit: no evaluation
    assert r.returncode == 0 and "validation loss" not in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_zero_blend_weight_is_one_line(tmp_path):
    """`--data-path 0 A 1 B` passed the check (weights non-negative, positive sum) and then failed with a
    traceback from megatron-core's BlendedDataset (`assert all(map(lambda _: _ > 0, weights))`)."""
    import numpy
    import torch
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for name in ("a", "b"):
        b = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=numpy.int32)
        b.add_document(torch.arange(1, 50), [49])
        b.finalize(str(tmp_path / f"{name}.idx"))
    class _Split:  # the oracle: megatron-core itself refuses a zero weight
        index_split = "train"
    with pytest.raises(AssertionError):
        BlendedDataset([_Split(), _Split()], [0.0, 1.0], 4, None)
    from megatron_staged.data.datasets import _parse_blend

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert _parse_blend(["0.3", a, "0.7", b], "--data-path") == ([a, b], [0.3, 0.7])
    from megatron_staged.data.validate import parse_data_path  # the check before anything is built

    for parse in (_parse_blend, parse_data_path):
        with pytest.raises(UserError, match=r"^--data-path: blend weights must be positive .*has weight 0: drop it"):
            parse(["0", a, "1", b], "--data-path")


def test_ckpt_step_loads_that_iteration(tmp_path):
    """Megatron-LM's --ckpt-step N loads iteration N of --load instead of the latest (was the generic
    refusal). Oracle: resuming from iteration 2 of a run saved at 1, 2, 3 repeats that run's iteration 3."""
    from conftest import run_cli

    flags = ["train", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--mock-data", "--vocab-size", "100",
             "--eval-iters", "0", "--log-interval", "1", "--progress-bar", "off", "--train-iters", "3",
             "--lr-decay-iters", "10"]
    ck = str(tmp_path / "ck")
    r = run_cli(flags + ["--save", ck, "--save-interval", "1"], timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    loss3 = [l for l in r.stdout.splitlines() if "] iteration        3/" in l]
    r = run_cli(flags + ["--load", ck, "--ckpt-step", "2"], timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"loaded checkpoint {ck}/iter_0000002 at iteration 2" in r.stdout
    again = [l for l in r.stdout.splitlines() if "] iteration        3/" in l]
    loss = lambda ls: re.search(r"lm loss: ([0-9.E+-]+)", ls[0]).group(1)
    assert len(loss3) == len(again) == 1 and loss(again) == loss(loss3)
    r = run_cli(flags + ["--load", ck, "--ckpt-step", "7"], timeout=300, check=False)
    assert r.returncode == 2 and "--ckpt-step 7: no " in r.stderr and "(iterations saved there: 1, 2, 3)" in r.stderr


def test_data_path_with_bin_suffix_names_the_prefix(tmp_path):
    """`--data-path web_text_document.bin` (a file, not Megatron-LM's prefix) said 'expected
    web_text_document.bin.bin': now the error names the prefix to give."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_staged.data.datasets import _parse_blend

    b = IndexedDatasetBuilder(str(tmp_path / "web_text_document.bin"), dtype=numpy.int32)
    b.add_document(torch.arange(1, 20), [19])
    b.finalize(str(tmp_path / "web_text_document.idx"))
    prefix = str(tmp_path / "web_text_document")
    for suffix in (".bin", ".idx"):
        with pytest.raises(UserError, match=rf"^--data-path: {re.escape(prefix + suffix)} is a file of the dataset; "
                                            rf"give its prefix, {re.escape(prefix)} "):
            _parse_blend([prefix + suffix], "--data-path")
    from megatron_staged.data.validate import check_indexed_dataset  # the check before anything is built

    with pytest.raises(UserError, match=rf"^--data-path: {re.escape(prefix)}.bin is a file of the dataset; "):
        check_indexed_dataset(prefix + ".bin")
    with pytest.raises(UserError, match="no indexed dataset at"):
        _parse_blend([prefix + "_nope"], "--data-path")
    assert _parse_blend([prefix], "--data-path") == ([prefix], None)


def test_deterministic_mode_environment_checks(monkeypatch):
    """--deterministic-mode as Megatron-LM's validate_args: with NCCL, NCCL_ALGO must name one of its
    all-reduce algorithms; on CUDA, torch's deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG (NVIDIA's
    functional configs set both). Then torch.use_deterministic_algorithms(True)."""
    import torch

    from megatron_staged.training.trainer import _deterministic_mode

    monkeypatch.delenv("NCCL_ALGO", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(UserError, match=r"NCCL_ALGO set to one of \['Tree', 'Ring'"):
        _deterministic_mode("nccl")
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        _deterministic_mode("nccl")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        _deterministic_mode("nccl")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
