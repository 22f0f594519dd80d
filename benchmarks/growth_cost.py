#!/usr/bin/env python
"""Cost of an in-run growth (time, memory, bytes read) against one checkpoint save + load.

Run on 4 CPU ranks::

    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore torchrun --nproc-per-node 4 benchmarks/growth_cost.py \\
        --out-json /tmp/growth_cost.json --write-docs

What it does, on every rank:

1. records the process's RSS after the imports and ``init_distributed`` (the *baseline*: before
   anything is built), and starts a thread sampling this process's RSS every ``--sample-ms``;
2. builds the project's ``Trainer`` on the source model (default gpt2, 6 layers x 512, mock data,
   vocab 8192, seq 64, micro batch 1, TP2 PP2) and runs ``--train-steps`` steps so that the Adam
   moments are real;
3. grows it inside the run with ``StageRunner.grow`` (the code path of a configured growth stage:
   eval before, pre-growth save, freeing the source, process-group rebuild, building the target
   model/optimizer/scheduler, ``grow_sharded_state`` from the saved checkpoint, eval after), default
   depth x2 + width x2 -> 12 layers x 1024 (>= 100M parameters, asserted). Each part is timed by
   wrapping the functions ``StageRunner.grow`` and ``grow_from_checkpoint`` call (module attributes
   patched for the duration of the growth only; the code that runs is the project's);
4. saves the grown state with ``save_checkpoint`` and loads it back with ``load_checkpoint`` into
   the same components, timed, for the comparison "growth costs no more than one save + load";
5. reports per rank: the wall time of each part, bytes read by the growth and bytes/s, the grown
   state's bytes (local parameters + Adam moments, and the DDP grad buffer separately), and peak
   RSS (sampled per phase, and ``ru_maxrss`` for the process's lifetime peak), raw and minus the
   baseline.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
HEADING = "Growth cost"
MB = 1 << 20


from common import machine_info as common_machine_info, replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("source model, data and layout")
    g.add_argument("--model-family", default="gpt2", choices=["gpt2", "llama"])
    g.add_argument("--num-layers", type=int, default=6)
    g.add_argument("--hidden-size", type=int, default=512)
    g.add_argument("--num-attention-heads", type=int, default=8)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--mock-data", action="store_true", default=True, help="mock data (always on: no corpus needed)")
    g.add_argument("--vocab-size", type=int, default=8192)
    g.add_argument("--tp", type=int, default=2)
    g.add_argument("--pp", type=int, default=2)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--train-steps", type=int, default=2, help="source steps before the growth (real moments)")
    g = p.add_argument_group("growth")
    g.add_argument("--depth-factor", type=float, default=2.0)
    g.add_argument("--width-factor", type=int, default=2, choices=[1, 2])
    g.add_argument("--depth-init", default="identity", choices=["identity", "copy", "random"])
    g.add_argument("--target-tp", type=int, default=None)
    g.add_argument("--target-pp", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=1, help="eval batches before/after the growth (StageRunner)")
    g.add_argument("--min-params", type=float, default=100e6, help="assert the grown model has at least this many")
    g = p.add_argument_group("measurement")
    g.add_argument("--workdir", default=None, help="where the grown checkpoint is written (default: a temp dir)")
    g.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling period")
    g.add_argument("--out-json", default=None)
    g.add_argument("--write-docs", action="store_true", help=f"write the '{HEADING}' section of docs/benchmarks.md")
    g.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: (re)write the docs section from a saved --out-json result")
    g.add_argument("--docs", default=DOCS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- memory ---------------------------------------------------------------------------------------

class RssSampler(threading.Thread):
    """Samples this process's RSS; keeps the peak per named phase."""

    def __init__(self, period_s: float):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.period = period_s
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self._halt = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def set_phase(self, name: str) -> None:
        self._note()
        self.phase = name
        self._note()

    def _note(self):
        r = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
        self.samples += 1

    def run(self):
        while not self._halt.wait(self.period):
            self._note()

    def stop(self):
        self._halt.set()
        self.join()
        self._note()


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def state_bytes(model_chunks, optimizer) -> dict:
    """This rank's parameter, optimizer-state and grad-buffer bytes."""
    import torch

    seen = set()
    params = 0
    for chunk in model_chunks:
        for p in chunk.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel() * p.element_size()
    moments, main_params, other = 0, 0, 0
    opts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for o in opts:
        inner = getattr(o, "optimizer", o)
        for st in inner.state.values():
            for k, v in st.items():
                if not torch.is_tensor(v) or v.numel() <= 1:
                    continue
                n = v.numel() * v.element_size()
                if k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    moments += n
                else:
                    other += n
        for group in getattr(o, "shard_fp32_from_float16_groups", None) or []:
            for p in group:
                main_params += p.numel() * p.element_size()
    grad_buffer = 0
    for chunk in model_chunks:
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if getattr(buf, "grad_data", None) is not None:
                grad_buffer += buf.grad_data.numel() * buf.grad_data.element_size()
            if getattr(buf, "param_data", None) is not None:
                grad_buffer += 0  # the params live in it; counted above
    return {"params": params, "moments": moments, "main_params": main_params, "other_optimizer": other,
            "state": params + moments + main_params, "grad_buffer": grad_buffer,
            "num_params_local": sum(p.numel() for c in model_chunks for p in c.parameters())}


# ---- timing hooks around the project's growth code -----------------------------------------------

class Timers:
    """Wall time per part; with a sampler, also the RSS peak inside each part and the RSS after it."""

    def __init__(self, sampler=None):
        self.t: dict[str, float] = {}
        self.rss_after: dict[str, int] = {}
        self.sampler = sampler
        self.patched: list = []

    def wrap(self, obj, attr: str, label: str):
        orig = getattr(obj, attr)

        def timed(*args, **kwargs):
            prev = self.sampler.phase if self.sampler else None
            if self.sampler:
                self.sampler.set_phase("part:" + label)
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0
                if self.sampler:
                    self.rss_after[label] = self.sampler.rss()
                    self.sampler.set_phase(prev)

        setattr(obj, attr, timed)
        self.patched.append((obj, attr, orig))

    def restore(self):
        for obj, attr, orig in reversed(self.patched):
            setattr(obj, attr, orig)
        self.patched = []


def source_flags(a, train_iters: int) -> list[str]:
    f = ["--model-family", a.model_family, "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
         "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
         "--micro-batch-size", str(a.micro_batch_size), "--tensor-model-parallel-size", str(a.tp),
         "--pipeline-model-parallel-size", str(a.pp), "--mock-data", "--vocab-size", str(a.vocab_size),
         "--train-iters", str(train_iters), "--lr", "1e-4", "--lr-warmup-iters", "0", "--eval-iters",
         str(a.eval_iters), "--progress-bar", "off", "--transformer-impl", "local"]
    if a.global_batch_size:
        f += ["--global-batch-size", str(a.global_batch_size)]
    if a.use_distributed_optimizer:
        f += ["--use-distributed-optimizer"]
    return f


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.from_json:
        write_docs(a.docs, json.load(open(a.from_json)))
        print(f"wrote the '{HEADING}' section of {a.docs} from {a.from_json}")
        return 0
    import torch
    import torch.distributed as dist

    from megatron_staged.runtime.distributed import init_distributed

    init_distributed("auto")
    world, rank = dist.get_world_size(), dist.get_rank()
    import megatron.core  # noqa: F401  (import cost belongs to the baseline)
    from megatron.core.distributed import DistributedDataParallel  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401

    import megatron_staged.checkpoint.manager as manager
    import megatron_staged.growth.apply as apply_mod
    import megatron_staged.staging.stages as stages_mod
    import megatron_staged.training.lr as lr_mod
    import megatron_staged.training.trainer as trainer_mod
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.growth.spec import target_config
    from megatron_staged.model.builder import count_parameters
    from megatron_staged.staging.stages import spec_for_stage

    gc.collect()
    dist.barrier()
    baseline = RssSampler(a.sample_ms / 1e3).rss()
    sampler = RssSampler(a.sample_ms / 1e3)
    sampler.start()
    mem = {"baseline_rss": baseline}

    # ---- source ------------------------------------------------------------------------------------
    sampler.set_phase("source")
    t0 = time.perf_counter()
    flags = source_flags(a, a.train_steps + 10)
    cfg = config_from_args(_train_parser("megatron-staged train").parse_args(flags))
    trainer = trainer_mod.Trainer(cfg)
    t_build_source = time.perf_counter() - t0
    src_state = state_bytes(trainer.model, trainer.optimizer)
    src_params = count_parameters(trainer.cfg)["total"]
    step_times = []
    for chunk in trainer.model:
        chunk.train()
    for _ in range(a.train_steps):
        t1 = time.perf_counter()
        loss, _, _ = trainer.train_step()
        step_times.append(time.perf_counter() - t1)
        trainer.iteration += 1
        trainer.consumed_samples += trainer.cfg.training.global_batch_size
    mem["after_source_rss"] = sampler.rss()
    mem["source_peak_rss"] = sampler.peaks.get("source", 0)

    stage = {"at_iteration": trainer.iteration, "depth_factor": a.depth_factor, "width_factor": a.width_factor,
             "depth_init": a.depth_init, "eval_iters": a.eval_iters}
    if a.target_tp:
        stage["target_tensor_model_parallel_size"] = a.target_tp
    if a.target_pp:
        stage["target_pipeline_model_parallel_size"] = a.target_pp
    new_cfg_preview = target_config(trainer.cfg, spec_for_stage(stage, trainer.cfg), world)
    grown_params = count_parameters(new_cfg_preview)["total"]
    assert grown_params >= a.min_params, f"grown model has {grown_params:,} parameters < {a.min_params:,.0f}"
    if rank == 0:
        print(f"source {src_params / 1e6:.1f}M params -> grown {grown_params / 1e6:.1f}M params "
              f"({new_cfg_preview.model.num_layers} layers x {new_cfg_preview.model.hidden_size}); "
              f"source step {1e3 * min(step_times):.0f} ms", flush=True)

    # ---- growth (StageRunner.grow, parts timed) -----------------------------------------------------
    orig_bmc = trainer_mod.build_model_chunks
    timers = Timers(sampler)
    timers.wrap(trainer, "evaluate", "eval before+after")
    timers.wrap(manager, "save_checkpoint", "pre-growth save")
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # A one-time cost inside the first torch_dist save of a process: megatron spawns a
    # multiprocessing Manager for the writers' results queue (a fresh interpreter, "spawn"), and the
    # first put() of the write results makes that server unpickle them, i.e. import torch.
    setup_label = "  of which: first-save setup (Manager spawn + its first put)"
    orig_q = filesystem_async._get_write_results_queue

    def timed_queue():
        t = time.perf_counter()
        fresh = filesystem_async._results_queue is None
        q = orig_q()
        timers.t[setup_label] = timers.t.get(setup_label, 0.0) + time.perf_counter() - t
        if fresh:
            put = q.put
            first = [True]

            def timed_put(*args, **kwargs):
                t1 = time.perf_counter()
                try:
                    return put(*args, **kwargs)
                finally:
                    if first[0]:
                        first[0] = False
                        timers.t[setup_label] += time.perf_counter() - t1

            q.put = timed_put
        return q

    filesystem_async._get_write_results_queue = timed_queue
    timers.patched.append((filesystem_async, "_get_write_results_queue", orig_q))
    timers.wrap(apply_mod, "set_parallel_layout", "process-group rebuild")
    timers.wrap(trainer_mod, "build_model_chunks", "build target model (+init)")
    timers.wrap(trainer_mod, "build_optimizer", "build target optimizer")
    timers.wrap(lr_mod, "build_scheduler", "build target scheduler")
    timers.wrap(trainer, "replace_components", "replace components (iterators)")

    class _GC:  # StageRunner.grow calls gc.collect() after dropping the source model
        @staticmethod
        def collect(*args):
            t = time.perf_counter()
            try:
                return gc.collect(*args)
            finally:
                timers.t["free source (gc)"] = timers.t.get("free source (gc)", 0.0) + time.perf_counter() - t

    stages_mod.gc = _GC
    grow_stats = {}
    orig_gss = apply_mod.grow_sharded_state

    def grab_stats(*args, **kwargs):
        out = orig_gss(*args, **kwargs)
        grow_stats.update(out)
        mem["rss_after_grow_sharded_state"] = sampler.rss()
        return out

    apply_mod.grow_sharded_state = grab_stats  # keeps its stats; timed by the wrapper around it
    timers.wrap(apply_mod, "grow_sharded_state", "grow_sharded_state")

    dist.barrier()
    sampler.set_phase("growth")
    t0 = time.perf_counter()
    try:
        entry = trainer.stages.grow(stage)
    finally:
        t_grow = time.perf_counter() - t0
        timers.restore()
        apply_mod.grow_sharded_state = orig_gss
        stages_mod.gc = gc
        del trainer.evaluate, trainer.replace_components  # back to the class's methods
    assert trainer_mod.build_model_chunks is orig_bmc
    mem["after_growth_rss"] = sampler.rss()
    mem["growth_peak_rss_sampled"] = max([sampler.peaks.get("growth", 0)] + [
        v for k, v in sampler.peaks.items() if k.startswith("part:")])
    mem["maxrss_after_growth"] = ru_maxrss()
    grown_state = state_bytes(trainer.model, trainer.optimizer)
    parts = dict(timers.t)
    parts["other (target_config, load_common, logging, temp dir removal)"] = t_grow - sum(
        v for k, v in parts.items() if not k.startswith("  "))

    # ---- one save + load of the grown state --------------------------------------------------------
    sampler.set_phase("save+load")
    holder = [a.workdir or (tempfile.mkdtemp(prefix="growth_cost_") if rank == 0 else None)]
    dist.broadcast_object_list(holder, src=0)
    ckpt_root = os.path.join(holder[0], "grown")
    dist.barrier()
    t0 = time.perf_counter()
    manager.save_checkpoint(ckpt_root, trainer.iteration, trainer.model, trainer.optimizer, trainer.scheduler,
                            trainer.train_state(), trainer.cfg.to_dict())
    t_save = time.perf_counter() - t0
    ckpt_bytes = 0
    if rank == 0:
        for d, _, files in os.walk(ckpt_root):
            ckpt_bytes += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    dist.barrier()
    t0 = time.perf_counter()
    manager.load_checkpoint(ckpt_root, trainer.model, trainer.optimizer, trainer.scheduler)
    t_load = time.perf_counter() - t0
    mem["saveload_peak_rss_sampled"] = sampler.peaks.get("save+load", 0)
    mem["maxrss_end"] = ru_maxrss()
    sampler.stop()
    dist.barrier()
    if rank == 0 and not a.workdir:
        shutil.rmtree(holder[0], ignore_errors=True)

    part_mem = {label: {"peak_rss": sampler.peaks.get("part:" + label, 0), "rss_after": timers.rss_after.get(label, 0)}
                for label in timers.t}
    mine = {"rank": rank, "mem": mem, "parts": parts, "part_mem": part_mem, "grow_total_s": t_grow, "save_s": t_save, "load_s": t_load,
            "grow_sharded_state": grow_stats, "grown_state": grown_state, "source_state": src_state,
            "build_source_s": t_build_source, "source_step_s": step_times, "rss_samples": sampler.samples,
            "layout_after": entry.get("to"), "loss_before": entry.get("eval_loss_before"),
            "loss_after": entry.get("eval_loss_after")}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        result = report(a, world, flags, stage, src_params, grown_params, new_cfg_preview, ckpt_bytes, gathered)
        if a.out_json:
            with open(a.out_json, "w") as fh:
                json.dump(result, fh, indent=1)
        if a.write_docs:
            write_docs(a.docs, result)
            print(f"wrote the '{HEADING}' section of {a.docs}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---- report ---------------------------------------------------------------------------------------

def machine_info(world: int) -> dict:
    return dict(common_machine_info(world), loadavg_end=list(os.getloadavg()))


def report(a, world, flags, stage, src_params, grown_params, new_cfg, ckpt_bytes, g) -> dict:
    info = machine_info(world)
    names = list(g[0]["parts"])
    part_names = []
    for n in names:  # nested parts ("  of which: ...") right after the pre-growth save
        if not n.startswith("  "):
            part_names.append(n)
            if n == "pre-growth save":
                part_names += [m for m in names if m.startswith("  ")]
    ranks = []
    for r in g:
        m, st = r["mem"], r["grown_state"]
        peak_growth = max(m["growth_peak_rss_sampled"], m.get("rss_after_grow_sharded_state", 0))
        gss = r["grow_sharded_state"]
        ranks.append({
            "rank": r["rank"], "grow_total_s": r["grow_total_s"], "save_s": r["save_s"], "load_s": r["load_s"],
            "parts": r["parts"],
            "bytes_read": gss.get("bytes_read", 0), "gss_seconds": gss.get("seconds", 0.0),
            "read_MBps": gss.get("bytes_read", 0) / MB / max(gss.get("seconds", 1e-9), 1e-9),
            "state_bytes": st["state"], "params_bytes": st["params"], "moments_bytes": st["moments"],
            "grad_buffer_bytes": st["grad_buffer"], "local_params": st["num_params_local"],
            "baseline_rss": m["baseline_rss"], "source_peak_rss": m["source_peak_rss"],
            "after_source_rss": m["after_source_rss"],
            "growth_peak_rss": peak_growth, "after_growth_rss": m["after_growth_rss"],
            "maxrss_after_growth": m["maxrss_after_growth"], "saveload_peak_rss": m["saveload_peak_rss_sampled"],
            "maxrss_end": m["maxrss_end"],
            "growth_peak_over_baseline_vs_state": (peak_growth - m["baseline_rss"]) / st["state"],
            "growth_peak_raw_vs_state": peak_growth / st["state"],
            "maxrss_over_baseline_vs_state": (m["maxrss_after_growth"] - m["baseline_rss"]) / st["state"],
            "steady_over_baseline_vs_state": (m["after_growth_rss"] - m["baseline_rss"]) / st["state"],
            "saveload_peak_over_baseline_vs_state": (m["saveload_peak_rss_sampled"] - m["baseline_rss"]) / st["state"],
        })
    slow = {k: max(r[k] for r in ranks) for k in ("grow_total_s", "save_s", "load_s")}
    parts_max = {p: max(r["parts"].get(p, 0.0) for r in ranks) for p in part_names}
    # memory in each part, over the baseline, worst rank (MiB)
    parts_mem = {}
    for p_ in part_names:
        peaks = [x["part_mem"].get(p_, {}).get("peak_rss", 0) - x["mem"]["baseline_rss"] for x in g
                 if x["part_mem"].get(p_, {}).get("peak_rss")]
        afters = [x["part_mem"].get(p_, {}).get("rss_after", 0) - x["mem"]["baseline_rss"] for x in g
                  if x["part_mem"].get(p_, {}).get("rss_after")]
        parts_mem[p_] = {"peak_over_baseline_MiB": max(peaks) / MB if peaks else None,
                         "after_over_baseline_MiB": max(afters) / MB if afters else None}
    before_growth = max(x["mem"]["after_source_rss"] - x["mem"]["baseline_rss"] for x in g) / MB
    evals = parts_max.get("eval before+after", 0.0)
    saveload = slow["save_s"] + slow["load_s"]
    setup = sum(v for k, v in parts_max.items() if k.startswith("  of which: first-save setup"))
    total_read = sum(r["bytes_read"] for r in ranks)
    source_state_total = sum(x["source_state"]["state"] for x in g)
    gss_max = max(r["gss_seconds"] for r in ranks)
    cmd = ("OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore torchrun --nproc-per-node "
           f"{world} benchmarks/growth_cost.py " + " ".join(sys.argv[1:]))
    lay = g[0]["layout_after"] or {}
    result = {
        "command": cmd, "machine": info, "source_flags": flags, "stage": stage, "sample_ms": a.sample_ms,
        "source": {"params": src_params, "num_layers": a.num_layers, "hidden_size": a.hidden_size,
                   "tp": a.tp, "pp": a.pp, "step_s": min(g[0]["source_step_s"]) if g[0]["source_step_s"] else None},
        "grown": {"params": grown_params, "num_layers": new_cfg.model.num_layers,
                  "hidden_size": new_cfg.model.hidden_size, "num_attention_heads": new_cfg.model.num_attention_heads,
                  "padded_vocab_size": new_cfg.model.padded_vocab_size, "layout": lay},
        "slowest_rank": slow, "parts_slowest_rank": parts_max, "parts_memory": parts_mem,
        "rss_before_growth_over_baseline_MiB": before_growth,
        "growth_vs_saveload": slow["grow_total_s"] / saveload,
        "growth_without_evals_vs_saveload": (slow["grow_total_s"] - evals) / saveload,
        "first_save_setup_s": setup,
        "growth_without_evals_and_first_save_setup_vs_saveload": (slow["grow_total_s"] - evals - setup) / saveload,
        "grow_sharded_state_vs_saveload": parts_max.get("grow_sharded_state", 0.0) / saveload,
        "bytes_read_total": total_read, "source_state_bytes_total": source_state_total, "read_MBps_aggregate": total_read / MB / max(gss_max, 1e-9),
        "grown_checkpoint_bytes": ckpt_bytes, "per_rank": ranks,
        "eval_loss_before": g[0]["loss_before"], "eval_loss_after": g[0]["loss_after"],
    }
    p = print
    p(f"\n== growth cost: {a.model_family} {a.num_layers}x{a.hidden_size} ({src_params / 1e6:.1f}M) -> "
      f"{new_cfg.model.num_layers}x{new_cfg.model.hidden_size} ({grown_params / 1e6:.1f}M), "
      f"TP{a.tp} PP{a.pp} -> TP{lay.get('tp')} PP{lay.get('pp')} DP{lay.get('dp')}, {world} ranks", flush=True)
    p(f"  eval loss before {result['eval_loss_before']:.6f} after {result['eval_loss_after']:.6f}")
    p(f"  growth parts (slowest rank, s; RSS over baseline, worst rank, MiB: peak in the part / after it); "
      f"RSS over baseline before the growth {before_growth:.0f} MiB:")
    for k, v in parts_max.items():
        pm = parts_mem[k]
        pk = f"{pm['peak_over_baseline_MiB']:7.0f}" if pm["peak_over_baseline_MiB"] is not None else "      -"
        af = f"{pm['after_over_baseline_MiB']:7.0f}" if pm["after_over_baseline_MiB"] is not None else "      -"
        p(f"    {k:62s} {v:8.2f}  {pk} / {af}")
    p(f"  growth total (StageRunner.grow) {slow['grow_total_s']:.2f} s; without the two evals "
      f"{slow['grow_total_s'] - evals:.2f} s")
    p(f"  save {slow['save_s']:.2f} s + load {slow['load_s']:.2f} s = {saveload:.2f} s "
      f"(grown checkpoint {ckpt_bytes / MB:.0f} MiB)")
    p(f"  ratio growth / (save+load) = {result['growth_vs_saveload']:.2f} (without evals "
      f"{result['growth_without_evals_vs_saveload']:.2f}; without evals and the first-save setup "
      f"{result['growth_without_evals_and_first_save_setup_vs_saveload']:.2f}; grow_sharded_state alone "
      f"{result['grow_sharded_state_vs_saveload']:.2f})  goal <= 1")
    p(f"  bytes read by the growth: {total_read / MB:.0f} MiB over all ranks "
      f"({total_read / source_state_total:.1f}x the source's params + moments, {source_state_total / MB:.0f} MiB), "
      f"{result['read_MBps_aggregate']:.0f} MiB/s aggregate")
    p("  per rank: state = local params + Adam moments; peaks are RSS; ratios are to the state")
    p("  rank  state MiB  grad-buf  baseline  growth-peak  (-base)/state  raw/state  maxrss(-base)/state  "
      "steady(-base)/state  read MiB  MiB/s")
    for r in ranks:
        p(f"  {r['rank']:4d}  {r['state_bytes'] / MB:9.0f}  {r['grad_buffer_bytes'] / MB:8.0f}  "
          f"{r['baseline_rss'] / MB:8.0f}  {r['growth_peak_rss'] / MB:11.0f}  "
          f"{r['growth_peak_over_baseline_vs_state']:13.2f}  {r['growth_peak_raw_vs_state']:9.2f}  "
          f"{r['maxrss_over_baseline_vs_state']:19.2f}  {r['steady_over_baseline_vs_state']:19.2f}  "
          f"{r['bytes_read'] / MB:8.0f}  {r['read_MBps']:5.0f}")
    p(f"  load average at the end {info['loadavg_end']}", flush=True)
    return result


# ---- docs -----------------------------------------------------------------------------------------

def write_docs(path: str, r: dict) -> None:
    mi, s, gr = r["machine"], r["source"], r["grown"]
    lay = gr["layout"]
    def mib(x):
        return "-" if x is None else f"{x:.0f}"

    parts = "\n".join(f"| {k.strip()} | {v:.2f} | {mib(r['parts_memory'][k]['peak_over_baseline_MiB'])} | "
                      f"{mib(r['parts_memory'][k]['after_over_baseline_MiB'])} |"
                      for k, v in r["parts_slowest_rank"].items())
    rows = "\n".join(
        f"| {x['rank']} | {x['local_params'] / 1e6:.1f}M | {x['state_bytes'] / MB:.0f} | {x['grad_buffer_bytes'] / MB:.0f} | "
        f"{x['baseline_rss'] / MB:.0f} | {x['growth_peak_rss'] / MB:.0f} | {x['growth_peak_over_baseline_vs_state']:.2f} | "
        f"{x['growth_peak_raw_vs_state']:.2f} | {x['maxrss_over_baseline_vs_state']:.2f} | "
        f"{x['steady_over_baseline_vs_state']:.2f} | {x['bytes_read'] / MB:.0f} | {x['read_MBps']:.0f} |"
        for x in r["per_rank"])
    sl = r["slowest_rank"]
    worst = max(x["growth_peak_over_baseline_vs_state"] for x in r["per_rank"])
    worst_raw = max(x["growth_peak_raw_vs_state"] for x in r["per_rank"])
    body = f"""\
In-run growth (`StageRunner.grow`, the code path of a configured growth stage) of a model with
{gr['params'] / 1e6:.0f}M parameters after growth, on {mi['ranks']} CPU ranks, against one `save_checkpoint` +
`load_checkpoint` of the grown state in the same run. Goals: growth costs no more than one save +
load; peak memory per rank within 1.5x of that rank's grown state (local parameters + Adam moments).

Command:

```
{r['command']}
```

Source: {s.get('num_layers')} layers x {s.get('hidden_size')} ({s['params'] / 1e6:.1f}M parameters), TP{s['tp']} PP{s['pp']},
mock data (padded vocab {gr['padded_vocab_size']}), trained {r['stage']['at_iteration']} step(s) first so the Adam moments
are real. Growth: depth x{r['stage']['depth_factor']:g} ({r['stage']['depth_init']}) + width x{r['stage']['width_factor']}
-> {gr['num_layers']} layers x {gr['hidden_size']}, {gr['num_attention_heads']} heads ({gr['params'] / 1e6:.1f}M parameters),
TP{lay.get('tp')} PP{lay.get('pp')} DP{lay.get('dp')}. Eval loss just before / after the growth (same batches):
{r['eval_loss_before']:.6f} / {r['eval_loss_after']:.6f}.

Machine: {mi['ranks']} ranks on {mi['cpu_cores_usable']} usable CPU core(s) ({mi['cpu_model']}),
{(mi['mem_total'] or 0) / (1 << 30):.0f} GiB RAM, OMP_NUM_THREADS={mi['omp_num_threads']}, torch {mi['torch']},
megatron-core {mi['megatron_core']}, Python {mi['python']}, {mi['date']}; load average at the end
{', '.join(f'{x:.2f}' for x in mi['loadavg_end'])}.

**Time** (seconds, slowest rank per row) and memory in each part (RSS minus the baseline, worst
rank, MiB: the peak sampled inside the part, and the level right after it; before the growth:
{r['rss_before_growth_over_baseline_MiB']:.0f} MiB):

| part of the growth | s | peak RSS - baseline | RSS after - baseline |
|---|---|---|---|
{parts}
| **growth total** (`StageRunner.grow`) | **{sl['grow_total_s']:.2f}** | | |
| one `save_checkpoint` of the grown state | {sl['save_s']:.2f} | | |
| one `load_checkpoint` of the grown state | {sl['load_s']:.2f} | | |

- growth / (save + load) = **{r['growth_vs_saveload']:.2f}** (goal <= 1); without the two evaluations
  (the before/after loss check, not growth work): {r['growth_without_evals_vs_saveload']:.2f}; without the
  evaluations and the one-time setup of the first torch_dist save in the process
  ({r['first_save_setup_s']:.2f} s, see below): {r['growth_without_evals_and_first_save_setup_vs_saveload']:.2f};
  `grow_sharded_state` alone: {r['grow_sharded_state_vs_saveload']:.2f}.
- Bytes read by the growth (`grow_sharded_state`'s `bytes_read`): {r['bytes_read_total'] / MB:.0f} MiB over all ranks
  ({r['bytes_read_total'] / r['source_state_bytes_total']:.1f}x the source's parameters + moments, {r['source_state_bytes_total'] / MB:.0f} MiB summed over the ranks),
  {r['read_MBps_aggregate']:.0f} MiB/s aggregate (per rank below). The grown checkpoint is
  {r['grown_checkpoint_bytes'] / MB:.0f} MiB on disk.

**Memory** per rank (MiB; "state" = local parameters + Adam moments, the quantity the 1.5x goal
refers to; the DDP grad buffer is listed apart; "baseline" = RSS after imports and
`init_distributed`, before anything was built; growth peak = highest RSS sampled every
{r.get('sample_ms', 5):g} ms during `StageRunner.grow`; maxrss = `ru_maxrss`, the process's lifetime peak up to the end
of the growth):

| rank | local params | state | grad buffer | baseline | growth peak | (peak - baseline) / state | peak / state | (maxrss - baseline) / state | (RSS after growth - baseline) / state | read MiB | MiB/s |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Worst rank: (peak - baseline) / state = {worst:.2f}, raw peak / state = {worst_raw:.2f} (goal <= 1.5).

How to read the memory figures: raw RSS includes the Python interpreter, torch, megatron-core and
the gloo process groups (the baseline), which do not scale with the model, so the goal is judged
on peak minus baseline. Even that is more than the grown state by construction: the trained model
also holds the DDP grad buffer (4 bytes per parameter, i.e. a third of params + moments in fp32),
activations of the before/after evaluation, the source slices read for one layer at a time and their
grown copies, and glibc keeps freed heap pages (the source model's, the checkpoint reader's) mapped,
so RSS does not fall back when Python frees tensors. The "RSS after growth" column is the resident
level once the growth has finished.

**Where the time and the memory go** (from the code, and from a profile of rank 0 in a separate
run of this benchmark):

- *First-save setup* (one-time per process): megatron-core's torch_dist writer
  (`dist_checkpointing/strategies/filesystem_async.py`, `_get_write_results_queue`) starts a
  multiprocessing `Manager` with the *spawn* method, a fresh interpreter, and the first `put()` of
  write results makes that server unpickle them, i.e. import torch. The pre-growth save pays it
  when it is the first save of the process (an earlier `--save-interval` save would have paid it).
- *Build target model*: `growth/apply.py` builds the target with `build_model_chunks(new_cfg,
  initialize=True)`, so `init_global_weights` draws a random value for every target tensor,
  although `grow_sharded_state` then overwrites every tensor that has a source (all of them here:
  no fresh layers, `depth_init` not random).
- *Build target optimizer*: megatron's `get_megatron_optimizer` (parameter groups) and
  `init_optimizer_state` zero-filling the Adam moments (their storage is needed anyway).
- *grow_sharded_state* (`growth/engine.py`): one collective `dist_checkpointing.load` per slot
  (the non-layer tensors, then each local target layer), each with its own global planning
  (all-gather / reduce-scatter of plans and metadata); every TP rank reads the *whole* source layer
  and computes the whole grown global tensor, of which it keeps 1/TP; with depth x2 interleave
  target layers 2i and 2i+1 both come from source layer i on the same stage, but `loaded` and
  `cache` are dropped after every slot, so each source layer is read and grown twice, hence the
  read volume above; and `growth/operators.py` `grow_width` multiplies the (4x larger) grown tensor
  by the moment scale, also by 1.0 for parameters, an extra full pass and allocation per tensor.
- *Memory*: the peak is inside `grow_sharded_state` (table above): on top of the target's
  parameters, grad buffer and moments, one slot holds the source slices of the layer and the grown
  *full-width global* tensor of every key and state kind of the layer (`cache`, kept until the slot
  ends) plus the intermediates of `grow_width`; then the freed heap stays mapped.

**Noise.** Measured on a shared, busy machine ({mi['ranks']} ranks on {mi['cpu_cores_usable']} cores while other jobs
were running): the times are upper bounds of what a quiet machine gives, and the memory figures are
not affected. The lead will re-run this on a quiet machine.
"""
    replace_section(path, HEADING, body)


if __name__ == "__main__":
    sys.exit(main())
