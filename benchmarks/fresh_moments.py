"""Adam update sizes of fresh-moment elements after a growth, and the loss with and without the fix.

Setting (issue 8, item 7): gpt2 2 -> 4 layers (interleave, identity init) at iteration G on the
built-in corpus, rho 1.4, re-warmup 10, quickstart's model and schedule; the run continues to
iteration G + 100. Per run it records, for the first 100 steps after the growth, the mean
``|update| / lr`` (weight decay excluded) over the *fresh* elements (zero moments at the growth:
the new layers' linear_proj / linear_fc2) and over the carried-over ones; and the eval loss
every 10 iterations. Modes: ``fresh_moments: zero`` (default) and ``bias-corrected``, plus a
4-layer model trained from scratch on the same data and schedule, for two seeds.

    OMP_NUM_THREADS=1 python benchmarks/fresh_moments.py [--seeds 1234 1235] [--grow-at 100] \
        [--after 100] [--write docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["--model-family", "gpt2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
         "--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "2e-3", "--min-lr", "2e-4",
         "--lr-warmup-iters", "20", "--lr-decay-style", "cosine", "--eval-iters", "4", "--eval-interval", "10",
         "--log-interval", "1000", "--progress-bar", "off"]


def run(mode: str, seed: int, grow_at: int, after: int, data: list, workdir: str) -> dict:
    import torch

    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.growth.fresh_moments import fresh_masks
    from megatron_staged.training.trainer import Trainer

    iters = grow_at + after
    log = os.path.join(workdir, f"{mode}_{seed}.jsonl")
    args = [*MODEL, *data, "--seed", str(seed), "--train-iters", str(iters), "--log-file", log,
            "--lr-decay-iters", str(3 * grow_at)]
    if mode == "scratch":
        args += ["--num-layers", "4"]
    else:
        cfg_file = os.path.join(workdir, f"{mode}.yaml")
        with open(cfg_file, "w") as fh:
            fh.write(f"staging:\n  stages:\n    - {{at_iteration: {grow_at}, depth_factor: 2, depth_placement: "
                     f"interleave, depth_init: identity, rho: 1.4, rewarmup_iters: 10, fresh_moments: {mode}}}\n")
        args += ["--num-layers", "2", "--config", cfg_file]
    tr = Trainer(config_from_args(_train_parser("bench").parse_args(args)))
    sizes = []  # per step after the growth: (mean |u|/lr fresh, mean |u|/lr carried)
    state = {"masks": None}
    orig_step = tr.train_step

    def train_step():
        if mode == "scratch" or tr.iteration < grow_at or len(sizes) >= after:
            return orig_step()
        if state["masks"] is None:
            fresh = {id(p): m for _, _, p, m in fresh_masks(tr.optimizer)}
            inner = [getattr(o, "optimizer", o) for o in (getattr(tr.optimizer, "chained_optimizers", None)
                                                          or [tr.optimizer])]
            state["masks"] = [(g, p, fresh.get(id(p), torch.zeros_like(p, dtype=torch.bool)))
                              for o in inner for g in o.param_groups for p in g["params"]]
        before = [(g["lr"], g.get("weight_decay", 0.0), p.detach().clone()) for g, p, _ in state["masks"]]
        out = orig_step()
        sf = nf = sc = nc = 0.0
        for (lr, wd, p0), (_, p, m) in zip(before, state["masks"]):
            u = (p.detach() - p0 * (1 - lr * wd)).abs() / lr
            sf += float(u[m].sum())
            nf += int(m.sum())
            sc += float(u[~m].sum())
            nc += int((~m).sum())
        sizes.append((sf / max(nf, 1), sc / max(nc, 1)))
        return out

    tr.train_step = train_step
    t0 = time.time()
    tr.train()
    evals = {}
    for line in open(log):
        r = json.loads(line)
        if "eval_loss" in r:
            evals[r["iteration"]] = r["eval_loss"]
    return {"mode": mode, "seed": seed, "sizes": sizes, "eval": evals, "seconds": time.time() - t0}


def summarize(results: list, grow_at: int) -> str:
    lines = []
    lines.append("Mean Adam update per element after the growth, in units of the LR (|u|/lr, weight decay "
                 "excluded); fresh = elements whose moments were zero at the growth (the new layers' "
                 "linear_proj and linear_fc2), carried = all others:\n")
    lines.append("| seed | fresh_moments | fresh, steps 1-10 | fresh, 11-50 | fresh, 51-100 | fresh, max | "
                 "carried, 1-10 | carried, 11-100 |")
    lines.append("|---|---|---|---|---|---|---|---|")

    def mean(xs):
        return sum(xs) / max(len(xs), 1)
    for r in results:
        if r["mode"] == "scratch":
            continue
        f = [a for a, _ in r["sizes"]]
        c = [b for _, b in r["sizes"]]
        lines.append(f"| {r['seed']} | {r['mode']} | {mean(f[:10]):.2f} | {mean(f[10:50]):.2f} | "
                     f"{mean(f[50:100]):.2f} | {max(f):.2f} | {mean(c[:10]):.2f} | {mean(c[10:100]):.2f} |")
    its = sorted({i for r in results for i in r["eval"] if i >= grow_at})
    lines.append("\nEval loss (4 batches of the validation split) after the growth at iteration "
                 f"{grow_at}; scratch = a 4-layer model trained from iteration 0:\n")
    lines.append("| seed | run | " + " | ".join(str(i) for i in its) + " |")
    lines.append("|---|---|" + "---|" * len(its))
    for r in results:
        lines.append(f"| {r['seed']} | {r['mode']} | " + " | ".join(
            f"{r['eval'][i]:.4f}" if i in r["eval"] else "" for i in its) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    p.add_argument("--grow-at", type=int, default=100)
    p.add_argument("--after", type=int, default=100)
    p.add_argument("--modes", nargs="+", default=["zero", "bias-corrected", "scratch"])
    p.add_argument("--write", default=None, help="update this markdown file's section")
    p.add_argument("--json", default=None, help="also write the raw results here (after every run)")
    p.add_argument("--from-json", nargs="+", default=None,
                   help="only summarize results written by earlier --json runs (e.g. one per seed)")
    p.add_argument("--corpus-dir", default=None, help="where the built-in corpus is built or found")
    a = p.parse_args()
    if a.from_json:
        results = [dict(r, eval={int(k): v for k, v in r["eval"].items()})
                   for path in a.from_json for r in json.load(open(path))]
        return report(results, a)

    from megatron_staged.data import prepare_default_corpus

    work = tempfile.mkdtemp(prefix="fresh_moments_")
    info = prepare_default_corpus(a.corpus_dir or os.path.join(work, "corpus"))
    data = ["--data-path", info["data_prefix"], "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", info["tokenizer_model"], "--split", "95,5,0"]
    results = []
    for seed in a.seeds:
        for mode in a.modes:
            r = run(mode, seed, a.grow_at, a.after, data, work)
            print(json.dumps({k: r[k] for k in ("mode", "seed", "seconds")} | {"eval": r["eval"]}), flush=True)
            results.append(r)
            if a.json:
                json.dump(results, open(a.json, "w"))
    return report(results, a)


def report(results: list, a) -> int:
    text = summarize(results, a.grow_at)
    print(text)
    if a.write:
        from benchmarks.common import machine_info, replace_section

        seeds = sorted({r["seed"] for r in results})
        cmd = ("OMP_NUM_THREADS=1 python benchmarks/fresh_moments.py --seeds " + " ".join(map(str, seeds))
               + f" --grow-at {a.grow_at} --after {a.after} --write {a.write}")
        body = (f"Command: `{cmd}`\n\nMachine: `{json.dumps(machine_info(1))}`\n\n" + text + "\n")
        replace_section(a.write, "Fresh Adam moments after growth (issue 8, item 7)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
