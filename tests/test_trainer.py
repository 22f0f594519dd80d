"""Trainer properties on CPU/gloo with several processes: layout independence, exact resume,
resharding on resume, atomic saves, and one-line errors for bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_GPT2, TINY_LLAMA, losses, torchrun

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 2, 2)]


def _layout_flags(tp, pp):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def _train(tmp_path, name, tp, pp, dp, extra, corpus):
    log = tmp_path / f"{name}.jsonl"
    torchrun(["train", *extra, *corpus, *_layout_flags(tp, pp), "--log-file", str(log)], nproc=tp * pp * dp)
    return losses(log)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_first_iterations_agree_across_layouts(tmp_path, corpus, family):
    """Same seed and data: the first 5 losses agree across (TP,PP,DP) to 1e-5 relative (fp32)."""
    base = TINY_GPT2 if family == "gpt2" else TINY_LLAMA
    extra = [*base, "--train-iters", "5", "--use-distributed-optimizer"]
    layouts = LAYOUTS if family == "gpt2" else [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
    results = {lay: _train(tmp_path, f"{family}_{lay}", *lay, extra, corpus) for lay in layouts}
    ref = results[(1, 1, 1)]
    assert sorted(ref) == [1, 2, 3, 4, 5]
    assert ref[5] < ref[1], "loss should fall over 5 iterations"
    for lay, got in results.items():
        for it in ref:
            assert got[it] == pytest.approx(ref[it], rel=1e-5), f"layout {lay} iteration {it}"


def test_exact_resume(tmp_path, corpus):
    """2N iterations straight == N, save, new process, load, N more (same losses)."""
    extra = [*TINY_GPT2, "--train-iters", "6", "--use-distributed-optimizer", *_layout_flags(1, 2)]
    straight = tmp_path / "straight.jsonl"
    # the uninterrupted run under the real torchrun (the rest fork their ranks from the tests' zygote):
    # both launches must give the same losses
    torchrun(["train", *extra, *corpus, "--log-file", str(straight)], nproc=4, real=True)
    ckpt = tmp_path / "ckpt"
    first = tmp_path / "first.jsonl"
    torchrun(["train", *extra, *corpus, "--exit-interval", "3", "--save", str(ckpt), "--log-file", str(first)], nproc=4)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    second = tmp_path / "second.jsonl"
    torchrun(["train", *extra, *corpus, "--load", str(ckpt), "--log-file", str(second)], nproc=4)
    a, b, c = losses(straight), losses(first), losses(second)
    assert sorted(b) == [1, 2, 3] and sorted(c) == [4, 5, 6]
    for it in range(1, 7):
        assert (b if it <= 3 else c)[it] == a[it], f"iteration {it}: resumed run differs"


def test_reshard_on_resume(tmp_path, corpus):
    """Saved at TP2 PP2, resumed at TP1 PP1 and at TP2 PP1 DP2: next loss == uninterrupted run."""
    extra = [*TINY_LLAMA, "--train-iters", "4", "--use-distributed-optimizer"]
    ref_log = tmp_path / "ref.jsonl"
    ckpt = tmp_path / "ckpt"
    torchrun(["train", *extra, *corpus, *_layout_flags(2, 2), "--log-file", str(ref_log)], nproc=4)
    torchrun(["train", *extra, *corpus, *_layout_flags(2, 2), "--exit-interval", "3", "--save", str(ckpt)], nproc=4)
    ref = losses(ref_log)
    for (tp, pp, dp) in [(1, 1, 1), (2, 1, 2)]:
        log = tmp_path / f"resume_{tp}{pp}{dp}.jsonl"
        r = torchrun(["train", *extra, *corpus, *_layout_flags(tp, pp), "--load", str(ckpt), "--log-file", str(log)],
                     nproc=tp * pp * dp)
        # the RNG streams are per (TP, PP) rank: another TP/PP gets a fresh stream, said as Megatron-LM says it
        assert f"(TP, PP) mismatch after resume (TP{tp} PP{pp} vs TP2 PP2 from checkpoint): RNG state not " \
            "restored" in r.stdout, r.stdout[-2000:]
        got = losses(log)
        assert sorted(got) == [4]
        assert got[4] == pytest.approx(ref[4], rel=1e-5), f"resumed at TP{tp} PP{pp} DP{dp}"


def test_killed_save_leaves_previous_checkpoint(tmp_path, corpus):
    """A save that dies part-way leaves the previous checkpoint as latest, and it still loads."""
    extra = [*TINY_GPT2, "--train-iters", "4", "--save-interval", "2"]
    ckpt = tmp_path / "ckpt"
    r = torchrun(["train", *extra, *corpus, "--save", str(ckpt)], nproc=2, check=False,
                 env={"MEGATRON_STAGED_FAULT": "save:4"})
    assert r.returncode != 0
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000004.tmp").exists() and not (ckpt / "iter_0000004").exists()
    log = tmp_path / "resume.jsonl"
    torchrun(["train", *extra, *corpus, "--load", str(ckpt), "--save", str(ckpt), "--log-file", str(log)], nproc=2)
    assert sorted(losses(log)) == [3, 4]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (ckpt / "iter_0000004.tmp").exists()


BAD = [
    (["--num-attention-heads", "3", "--hidden-size", "48", "--tensor-model-parallel-size", "2"],
     "not divisible by --tensor-model-parallel-size"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "3"], "--num-layers 4 is not divisible"),
    (["--micro-batch-size", "2", "--global-batch-size", "7"], "--global-batch-size 7 is not divisible"),
    (["--data-path", "/nonexistent/corpus_text_document", "--tokenizer-type", "NullTokenizer",
      "--vocab-size", "100"], "no indexed dataset"),
    (["--mock-data", "--hidden-size", "abc"], "--hidden-size"),
]


def test_bad_input_one_line_error(tmp_path):
    """Each bad input: non-zero exit, one 'error:' line saying what to fix, no traceback."""
    # an unreadable checkpoint: a tracker pointing at a directory of garbage
    broken = tmp_path / "broken"
    (broken / "iter_0000005").mkdir(parents=True)
    (broken / "latest_checkpointed_iteration.txt").write_text("5")
    (broken / "iter_0000005" / "common.pt").write_bytes(b"not a checkpoint")
    cases = BAD + [(["--mock-data", "--load", str(broken)], "damaged checkpoint")]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    procs = [(subprocess.Popen([sys.executable, "-m", "megatron_staged", "train", "--train-iters", "1",
                                "--progress-bar", "off", *args], cwd=str(ROOT), env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE), needle) for args, needle in cases]
    for p, needle in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, f"{needle}: exit {p.returncode}\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], err[-3000:]
