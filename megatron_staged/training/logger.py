"""Megatron's per-iteration log line, TensorBoard scalars, a progress bar and a JSON-lines log.

Every rank knows the loss (it is all-reduced from the last pipeline stage), so rank 0 does all of
the writing.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime

from megatron_staged.runtime.distributed import is_rank0


class MetricsLogger:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank0 = is_rank0()
        self.writer = None
        self.bar = None
        self.window: list[tuple[float, float, float]] = []  # (elapsed s, loss, flops) since the last log line
        self.jsonl = None
        if self.rank0 and cfg.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)
            except Exception as e:  # tensorboard is optional at run time
                print(f"warning: TensorBoard disabled ({e})", flush=True)
        if self.rank0 and cfg.logging.log_file:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.logging.log_file)), exist_ok=True)
            self.jsonl = open(cfg.logging.log_file, "a")

    def start(self, iteration: int, train_iters: int) -> None:
        mode = self.cfg.training.progress_bar
        if self.rank0 and (mode == "on" or (mode == "auto" and sys.stdout.isatty())):
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=iteration, dynamic_ncols=True, leave=False)

    def iteration(self, trainer, loss: float, grad_norm, elapsed: float, ok: bool) -> None:
        it = trainer.iteration
        t = trainer.cfg.training
        flops = getattr(trainer, "last_step_flops", None)
        if flops is None:
            from megatron_staged.training.flops import flops_per_iteration

            flops = flops_per_iteration(trainer.cfg.model, t.global_batch_size)
        active = getattr(trainer, "last_active_layers", None)
        self.window.append((elapsed, loss, flops))
        lr = trainer.optimizer.param_groups[0]["lr"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        record = {"iteration": it, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "consumed_samples": trainer.consumed_samples, "flops_so_far": trainer.flops_so_far,
                  "elapsed_ms": elapsed * 1e3, "num_layers": trainer.cfg.model.num_layers,
                  "hidden_size": trainer.cfg.model.hidden_size}
        if active is not None:
            record["active_layers"] = active
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.writer:
            self.writer.add_scalar("lm loss", loss, it)
            self.writer.add_scalar("lm loss vs flops", loss, int(trainer.flops_so_far))
            self.writer.add_scalar("learning-rate", lr, it)
            if grad_norm is not None:
                self.writer.add_scalar("grad-norm", grad_norm, it)
            self.writer.add_scalar("iteration-time", elapsed, it)
        if it % max(t.log_interval, 1) != 0:
            return
        ms = 1e3 * sum(e for e, _, _ in self.window) / len(self.window)
        avg_loss = sum(l for _, l, _ in self.window) / len(self.window)
        avg_flops = sum(f for _, _, f in self.window) / len(self.window)
        self.window = []
        tflops = avg_flops / (ms / 1e3) / trainer.world_size / 1e12
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        line = (f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] iteration {it:8d}/{t.train_iters:8d} |"
                f" consumed samples: {trainer.consumed_samples:12d} |"
                f" elapsed time per iteration (ms): {ms:.1f} |"
                f" throughput per GPU (TFLOP/s/GPU): {tflops:.3f} |"
                f" learning rate: {lr:.6E} | global batch size: {t.global_batch_size:5d} |"
                f" lm loss: {avg_loss:.6E} | grad norm: {gn} |"
                f" number of skipped iterations: {0 if ok else 1:3d} |")
        if active is not None:
            line += f" active layers: {active:.2f}/{trainer.cfg.model.num_layers} |"
        if self.writer:
            self.writer.add_scalar("throughput-tflops-per-gpu", tflops, it)
        self.print(line)

    def eval(self, trainer, loss: float) -> None:
        import math

        ppl = math.exp(min(loss, 20))
        self.print(f" validation loss at iteration {trainer.iteration} | lm loss value: {loss:.6E} |"
                   f" lm loss PPL: {ppl:.6E} |")
        if self.writer:
            self.writer.add_scalar("lm loss validation", loss, trainer.iteration)
        if self.jsonl:
            self.jsonl.write(json.dumps({"iteration": trainer.iteration, "eval_loss": loss,
                                         "flops_so_far": trainer.flops_so_far}) + "\n")
            self.jsonl.flush()

    def layer_drop_stage(self, e: dict) -> None:
        """A RaPTr stage transition (docs/raptr.md): log line and JSON record."""
        if e["until"] is None:
            text = (f" RaPTr schedule done at iteration {e['iteration']}: all {e['num_layers']} layers run from now on")
        else:
            text = (f" RaPTr stage {e['stage'] + 1}/{e['of']} at iteration {e['iteration']}: expected active layers "
                    f"{e['expected_active_layers']:.2f}/{e['num_layers']} (keep-probability {e['keep_prob']:.4f}) "
                    f"until iteration {e['until']}")
        self.event(text, **e)

    def event(self, text: str, **record) -> None:
        self.print(text)
        if self.jsonl and record:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def print(self, line: str) -> None:
        if not self.rank0:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer:
            self.writer.flush()
