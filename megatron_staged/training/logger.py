"""Megatron's per-iteration log line, TensorBoard scalars, a progress bar and a JSON-lines log.

Every rank knows the loss (it is all-reduced from the last pipeline stage), so rank 0 does all of
the writing.
"""
from __future__ import annotations

import json
import os
import sys
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
        # Megatron-LM's counts over the log interval: advanced, skipped (optimizer step not taken,
        # e.g. fp16 overflow) and nan (non-finite loss) iterations
        self.counts = {"advanced": 0, "skipped": 0, "nan": 0}
        self.wandb = None
        lg = cfg.logging
        if self.rank0 and lg.wandb_project:
            import wandb  # checked by config.validate_megatron

            self.wandb = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name, entity=lg.wandb_entity,
                                    dir=lg.wandb_save_dir or lg.tensorboard_dir, config=cfg.to_dict())
        if self.rank0 and cfg.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)
            except Exception as e:  # tensorboard is optional at run time
                print(f"warning: TensorBoard disabled ({e})", flush=True)
        if self.rank0 and cfg.logging.log_file:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.logging.log_file)), exist_ok=True)
            self.jsonl = open(cfg.logging.log_file, "a")
            if _ends_mid_line(cfg.logging.log_file):  # a run killed mid-write: start our records on a new line
                self.jsonl.write("\n")
                self.jsonl.flush()

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
        finite = loss == loss and abs(loss) != float("inf")
        self.counts["advanced" if ok else "skipped"] += 1
        self.counts["nan"] += 0 if finite else 1
        lg = trainer.cfg.logging
        loss_scale = _loss_scale(trainer.optimizer)
        params_norm = _params_norm(trainer.model) if lg.log_params_norm else None
        samples = trainer.consumed_samples
        if (self.writer or self.wandb) and it % max(lg.tensorboard_log_interval, 1) == 0:
            # Megatron-LM's tag names (training.py training_log), plus 'lm loss vs flops' for staging
            scalars = {"learning-rate": lr, "batch-size": t.global_batch_size, "lm loss": loss}
            if lg.log_loss_scale_to_tensorboard:
                scalars["loss-scale"] = loss_scale
            if lg.log_world_size_to_tensorboard:
                scalars["world-size"] = trainer.world_size
            if grad_norm is not None:
                scalars["grad-norm"] = grad_norm
            if params_norm is not None:
                scalars["params-norm"] = params_norm
            if lg.log_timers_to_tensorboard:
                scalars["iteration-time"] = elapsed
            if self.writer:
                self.writer.add_scalar("samples vs steps", samples, it)
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, it)
                    self.writer.add_scalar(tag + " vs samples", value, samples)
                self.writer.add_scalar("lm loss vs flops", loss, int(trainer.flops_so_far))
            if self.wandb:
                self.wandb.log(dict(scalars, **{"samples vs steps": samples}), step=it)
        if it % max(t.log_interval, 1) != 0:
            return
        ms = 1e3 * sum(e for e, _, _ in self.window) / len(self.window)
        avg_loss = sum(l for _, l, _ in self.window) / len(self.window)
        avg_flops = sum(f for _, _, f in self.window) / len(self.window)
        self.window = []
        tflops = avg_flops / (ms / 1e3) / trainer.world_size / 1e12
        # Megatron-LM's log line, field by field (training.py training_log); throughput only with
        # --log-throughput (printed with 3 decimals: CPU runs are far below 0.1 TFLOP/s)
        line = (f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}] iteration {it:8d}/{t.train_iters:8d} |"
                f" consumed samples: {trainer.consumed_samples:12d} |"
                f" elapsed time per iteration (ms): {ms:.1f} |")
        if lg.log_throughput:
            line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.3f} |"
            if self.writer and lg.log_timers_to_tensorboard:
                self.writer.add_scalar("throughput", tflops, it)
        line += (f" learning rate: {lr:.6E} | global batch size: {t.global_batch_size:5d} |"
                 f" lm loss: {avg_loss:.6E} | loss scale: {loss_scale:.1f} |")
        if grad_norm is not None:
            line += f" grad norm: {grad_norm:.3f} |"
        if params_norm is not None:
            line += f" params norm: {params_norm:.3f} |"
        line += (f" number of skipped iterations: {self.counts['skipped']:3d} |"
                 f" number of nan iterations: {self.counts['nan']:3d} |")
        if active is not None:  # RaPTr / layer dropping: this project's field, after Megatron's
            line += f" active layers: {active:.2f}/{trainer.cfg.model.num_layers} |"
        self.counts = {"advanced": 0, "skipped": 0, "nan": 0}
        self.print(line)

    def eval(self, trainer, loss: float) -> None:
        import math

        ppl = math.exp(min(loss, 20))
        self.print(f" validation loss at iteration {trainer.iteration} | lm loss value: {loss:.6E} |"
                   f" lm loss PPL: {ppl:.6E} |")
        lg = trainer.cfg.logging
        if self.writer:
            self.writer.add_scalar("lm loss validation", loss, trainer.iteration)
            self.writer.add_scalar("lm loss validation vs samples", loss, trainer.consumed_samples)
            if lg.log_validation_ppl_to_tensorboard:
                self.writer.add_scalar("lm loss validation ppl", ppl, trainer.iteration)
                self.writer.add_scalar("lm loss validation ppl vs samples", ppl, trainer.consumed_samples)
        if self.wandb:
            self.wandb.log({"lm loss validation": loss}, step=trainer.iteration)
        if self.jsonl:
            rec = {"iteration": trainer.iteration, "eval_loss": loss, "flops_so_far": trainer.flops_so_far}
            se = getattr(trainer, "last_eval_se", None)
            if se is not None and math.isfinite(se):
                rec["eval_loss_se"] = se  # standard error over the eval batches (sampling noise)
            self.jsonl.write(json.dumps(rec) + "\n")
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
        if self.wandb:
            self.wandb.finish()
            self.wandb = None


def _ends_mid_line(path: str) -> bool:
    """Whether the file is non-empty and its last byte is not a newline."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _loss_scale(optimizer) -> float:
    """The optimizer's current loss scale (1.0 without fp16 loss scaling), as Megatron-LM prints it."""
    try:
        scale = optimizer.get_loss_scale()
    except (AttributeError, TypeError):
        return 1.0
    return float(scale.item() if hasattr(scale, "item") else scale)


def _params_norm(model_chunks) -> float:
    """L2 norm of all parameters over the whole model (TP shards and PP stages; replicas once)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from megatron_staged.runtime.distributed import current_device

    # on the parameters' device: a host accumulator fails on GPU (mixed devices, and NCCL's all-reduce)
    sq = torch.zeros(1, dtype=torch.float64, device=current_device())
    for chunk in model_chunks:
        for p in chunk.parameters():
            if not param_is_not_tensor_parallel_duplicate(p):
                continue  # a replica of a TP-shared tensor: counted on TP rank 0
            if getattr(p, "shared_embedding", False) and not ps.is_pipeline_first_stage():
                continue  # the last stage's copy of tied embeddings: counted on the first stage
            sq += p.detach().double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return float(sq.sqrt())
