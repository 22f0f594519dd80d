"""The training loop: megatron-core's model, DDP, optimizer and pipeline schedules, composed.

``Trainer`` owns the components (model chunks, optimizer, LR scheduler, data iterators, logger)
and the run's bookkeeping (iteration, consumed samples, FLOPs so far, stage history). A growth
stage replaces the model, optimizer and scheduler through :meth:`Trainer.replace_components`;
the trainer knows *that* a stage boundary happened, never how an operator works.
"""
from __future__ import annotations

import math
import os
import sys
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from megatron_staged.config import Config, validate
from megatron_staged.errors import UserError
from megatron_staged.runtime.distributed import (Layout, barrier, current_layout, init_distributed,
                                                 print_rank0, set_parallel_layout, set_seed)
from megatron_staged.training.flops import flops_per_iteration
from megatron_staged.training.logger import MetricsLogger


# ---- components ---------------------------------------------------------------------------------

def build_model_chunks(cfg: Config, seed: Optional[int] = None, initialize: bool = True) -> list:
    """This rank's model chunk(s), wrapped in megatron DDP, initialised layout-independently."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_staged.model.builder import build_model, init_global_weights

    model = build_model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    if initialize:
        init_global_weights([model], cfg, cfg.training.seed if seed is None else seed)
    tcfg = model.config
    if cfg.model.bf16 or cfg.model.fp16:
        model = Float16Module(tcfg, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [DistributedDataParallel(tcfg, ddp_config, model)]


def build_optimizer(cfg: Config, model_chunks):
    from megatron.core.optimizer import OptimizerConfig as MOptConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_staged.checkpoint.manager import init_optimizer_state

    o, m = cfg.optim, cfg.model
    ocfg = MOptConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad, bf16=m.bf16, fp16=m.fp16, params_dtype=torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        loss_scale=None if m.fp16 else None, initial_loss_scale=2**16 if m.fp16 else None,
    )
    optimizer = get_megatron_optimizer(ocfg, model_chunks)
    init_optimizer_state(optimizer)
    return optimizer


def wire_schedule_hooks(model_chunks, optimizer, cfg: Config) -> None:
    """What Megatron-LM's training loop sets on the model config before the schedules run."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.timers = None
    if cfg.parallel.overlap_grad_reduce:
        config.no_sync_func = model_chunks[0].no_sync
    if cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer:
        config.param_sync_func = model_chunks[0].start_param_sync


# ---- forward step -----------------------------------------------------------------------------

def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss of one micro batch (the schedules divide by the number of micro batches)."""
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * mask) / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"]
    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, labels, position_ids = tokens.to(dev), labels.to(dev), position_ids.to(dev)
    loss_mask = batch.get("loss_mask", torch.ones_like(labels, dtype=torch.float)).to(dev)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, loss_mask)


def run_microbatches(model_chunks, data_iterator, num_microbatches: int, cfg: Config, forward_only: bool):
    """One pass of the pipeline schedule; returns the mean loss over all DP ranks (all ranks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        forward_only=forward_only,
    )
    return average_loss_over_ranks(losses)


def average_loss_over_ranks(losses) -> float:
    """Mean of the last pipeline stage's micro-batch losses over DP, made known to every rank."""
    from megatron.core import parallel_state as ps

    t = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and losses:
        t[0] = float(torch.stack([l["lm loss"] for l in losses]).mean())
        t[1] = 1.0
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


# model fields a user may change on resume: they do not change any weight's shape or meaning
NON_ARCHITECTURE_FIELDS = {"bf16", "fp16", "transformer_impl", "hidden_dropout", "attention_dropout",
                           "vocab_size", "seq_length", "init_method_std"}
GROWN_FIELDS = {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "group_query_attention"}


# ---- the trainer --------------------------------------------------------------------------------

class Trainer:
    """Pretrain (and grow) a GPT with megatron-core. Construct inside torchrun (or one process)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
        self.world_size = dist.get_world_size()
        self._adopt_checkpoint_model_config()
        validate(cfg, self.world_size)
        self.layout = set_parallel_layout(cfg.parallel.tensor_model_parallel_size,
                                          cfg.parallel.pipeline_model_parallel_size)
        set_seed(cfg.training.seed)
        self.iteration = 0
        self.consumed_samples = 0
        self.flops_so_far = 0.0
        self.stage_history: list[dict] = []
        self.loss_history: list[tuple[int, float, float]] = []  # (iteration, loss, flops so far)
        self.tokenizer = None
        self._build_data_and_vocab()
        self.model, self.optimizer, self.scheduler = self.build_components(cfg)
        self.logger = MetricsLogger(cfg)
        if cfg.checkpoint.load:
            self._load(cfg.checkpoint.load)
        self._build_iterators()
        from megatron_staged.staging.stages import StageRunner  # noqa: WPS433 (import cycle)

        self.stages = StageRunner(self)

    # -- setup ------------------------------------------------------------------------------------
    def _adopt_checkpoint_model_config(self) -> None:
        """On --load, the architecture comes from the checkpoint (flags may only agree with it)."""
        cfg = self.cfg
        if not cfg.checkpoint.load:
            return
        from megatron_staged.checkpoint.manager import load_common, resolve_checkpoint_dir
        from megatron_staged.config import Config as _C

        ckpt_dir, _ = resolve_checkpoint_dir(cfg.checkpoint.load)
        common = load_common(ckpt_dir)
        args = common.get("args")
        if not args:
            return
        saved = _C.from_dict(args).model
        explicit = getattr(cfg, "_explicit", set())
        if common.get("train_state", {}).get("stage_history"):
            # a grown run: the config file still describes the first stage's model
            explicit = explicit - GROWN_FIELDS
        for name, value in vars(saved).items():
            mine = getattr(cfg.model, name)
            if name in explicit and mine != value and name not in NON_ARCHITECTURE_FIELDS:
                raise UserError(f"--{name.replace('_', '-')} {mine} disagrees with the checkpoint "
                                f"{ckpt_dir} ({value}); drop the flag or load a matching checkpoint")
            if name not in explicit:
                setattr(cfg.model, name, value)

    def _build_data_and_vocab(self) -> None:
        from megatron_staged.data.setup import prepare_data

        self.tokenizer, self.datasets = prepare_data(self.cfg, self.world_size)
        from megatron_staged.model.builder import set_padded_vocab_size

        set_padded_vocab_size(self.cfg, self.tokenizer.vocab_size)

    def build_components(self, cfg: Config, initialize: bool = True):
        from megatron_staged.training.lr import build_scheduler

        model = build_model_chunks(cfg, initialize=initialize)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.training.train_iters,
                                    override=cfg.checkpoint.override_opt_param_scheduler)
        wire_schedule_hooks(model, optimizer, cfg)
        return model, optimizer, scheduler

    def replace_components(self, cfg: Config, model, optimizer, scheduler) -> None:
        """Continue on a new (grown) model; called by the staging runner at a stage boundary."""
        self.cfg = cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.layout = current_layout()
        self._build_iterators()

    def _build_iterators(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_staged.data import build_data_iterator

        t = self.cfg.training
        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        train_ds, valid_ds, _ = self.datasets
        self.train_iter = build_data_iterator(train_ds, self.consumed_samples, t.micro_batch_size, dpr, dp,
                                              num_workers=self.cfg.data.num_workers)
        self.valid_ds = valid_ds

    def train_state(self) -> dict:
        return {"iteration": self.iteration, "consumed_train_samples": self.consumed_samples,
                "flops_so_far": self.flops_so_far, "stage_history": list(self.stage_history),
                "loss_history": list(self.loss_history[-10000:])}

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Optional[str]:
        from megatron_staged.checkpoint.manager import save_checkpoint

        c = self.cfg.checkpoint
        if not c.save:
            return None
        t0 = time.time()
        path = save_checkpoint(c.save, self.iteration, self.model, self.optimizer, self.scheduler,
                               self.train_state(), self.cfg.to_dict(), save_optimizer=not c.no_save_optim)
        print_rank0(f"saved checkpoint at iteration {self.iteration:7d} to {c.save} in {time.time() - t0:.2f}s")
        return path

    def _load(self, path: str) -> None:
        from megatron_staged.checkpoint.manager import load_checkpoint

        c = self.cfg.checkpoint
        finetune = c.finetune
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                load_optimizer=not (c.no_load_optim or finetune),
                                load_rng=not (c.no_load_rng or finetune))
        if not finetune:
            self.iteration = int(state.get("iteration", 0))
            self.consumed_samples = int(state.get("consumed_train_samples", 0))
            self.flops_so_far = float(state.get("flops_so_far", 0.0))
            self.stage_history = list(state.get("stage_history", []))
            self.loss_history = [tuple(x) for x in state.get("loss_history", [])]
        print_rank0(f"loaded checkpoint {path} at iteration {self.iteration} "
                    f"(consumed samples {self.consumed_samples}, layout now {self.layout})")

    # -- loop -----------------------------------------------------------------------------------------
    @property
    def num_microbatches(self) -> int:
        t = self.cfg.training
        return t.global_batch_size // (t.micro_batch_size * self.layout.dp)

    def train_step(self) -> tuple[float, Optional[float], bool]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = run_microbatches(self.model, self.train_iter, self.num_microbatches, self.cfg, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return loss, grad_norm, ok

    @torch.no_grad()
    def evaluate(self, eval_iters: Optional[int] = None) -> float:
        """Mean loss over ``eval_iters`` global batches of the validation set (from its start)."""
        from megatron.core import parallel_state as ps

        from megatron_staged.data import build_data_iterator

        t = self.cfg.training
        n = eval_iters or t.eval_iters
        it = build_data_iterator(self.valid_ds, 0, t.micro_batch_size, ps.get_data_parallel_rank(),
                                 ps.get_data_parallel_world_size())
        for chunk in self.model:
            chunk.eval()
        losses = [run_microbatches(self.model, it, self.num_microbatches, self.cfg, forward_only=True)
                  for _ in range(n)]
        for chunk in self.model:
            chunk.train()
        return sum(losses) / len(losses)

    def train(self) -> dict:
        """Train to --train-iters (growing at the configured stages); returns a summary."""
        cfg = self.cfg
        t = cfg.training
        for chunk in self.model:
            chunk.train()
        save_interval = cfg.checkpoint.save_interval
        self.logger.start(self.iteration, t.train_iters)
        last_loss = float("nan")
        while self.iteration < t.train_iters:
            self.stages.maybe_grow()
            cfg, t = self.cfg, self.cfg.training
            t0 = time.time()
            loss, grad_norm, ok = self.train_step()
            elapsed = time.time() - t0
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            self.flops_so_far += flops_per_iteration(cfg.model, t.global_batch_size)
            self.loss_history.append((self.iteration, loss, self.flops_so_far))
            last_loss = loss
            if not math.isfinite(loss):
                raise RuntimeError(f"loss is {loss} at iteration {self.iteration}; stopping (lower --lr?)")
            self.logger.iteration(self, loss, grad_norm, elapsed, ok)
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                self.logger.eval(self, self.evaluate())
            if save_interval and self.iteration % save_interval == 0:
                self.save()
            if t.exit_interval and self.iteration % t.exit_interval == 0:
                break
        self.logger.close()
        if cfg.checkpoint.save and not (save_interval and self.iteration % save_interval == 0):
            self.save()
        return {"iteration": self.iteration, "loss": last_loss, "consumed_samples": self.consumed_samples,
                "flops_so_far": self.flops_so_far, "stage_history": self.stage_history}
