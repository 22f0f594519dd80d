"""The training loop: megatron-core's model, DDP, optimizer and pipeline schedules, composed.

``Trainer`` holds the components (built by :mod:`megatron_staged.builders`), the run's bookkeeping
(:class:`TrainState`), the data iterators and the logger. At a stage boundary the stage runner
returns grown components and state and the trainer continues on them; it knows *that* a growth
happened, never how an operator works.
"""
from __future__ import annotations

import itertools
import os
import math
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from megatron_staged.builders import build_components
from megatron_staged.config import Config, validate
from megatron_staged.data.setup import prepare_data
from megatron_staged.errors import UserError
from megatron_staged.growth.spec import GrowthRequest
from megatron_staged.model.builder import set_padded_vocab_size
from megatron_staged.runtime.distributed import (all_reduce_scalar, collective_device, current_device,
                                                 init_distributed, print_rank0)
from megatron_staged.staging.stages import StageRunner
from megatron_staged.training.flops import flops_per_iteration
from megatron_staged.training.guards import ExitConditions
from megatron_staged.training.logger import MetricsLogger
from megatron_staged.training.state import TrainState


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
    dev = current_device()  # the batch comes from the data loader in host memory
    tokens, labels = tokens.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    position_ids = position_ids.to(dev, non_blocking=True)
    loss_mask = batch.get("loss_mask")
    loss_mask = (torch.ones_like(labels, dtype=torch.float) if loss_mask is None
                 else loss_mask.to(dev, non_blocking=True))
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, loss_mask)


def run_microbatches(model_chunks, data_iterator, num_microbatches: int, cfg: Config, forward_only: bool):
    """One pass of the pipeline schedule; returns the mean loss over all DP ranks (all ranks)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if len(model_chunks) > 1 and not isinstance(data_iterator, list):
        # interleaved 1F1B takes one iterator per chunk, each over the same micro-batches
        data_iterator = list(itertools.tee(data_iterator, len(model_chunks)))
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

    t = torch.zeros(2, dtype=torch.float64, device=collective_device())  # NCCL: on the device
    if ps.is_pipeline_last_stage() and losses:
        t[0] = float(torch.stack([l["lm loss"] for l in losses]).mean())
        t[1] = 1.0
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _vp(side: dict) -> str:
    """The ' VPn' suffix of a layout with interleaved 1F1B (virtual pipeline stages), else ''."""
    return f" VP{side['vp']}" if side.get("vp") else ""


# model fields a user may change on resume: they do not change any weight's shape or meaning
NON_ARCHITECTURE_FIELDS = {"bf16", "fp16", "transformer_impl", "hidden_dropout", "attention_dropout",
                           "vocab_size", "seq_length", "init_method_std"}
GROWN_FIELDS = {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "group_query_attention"}


def _deterministic_mode(backend: str) -> None:
    """--deterministic-mode, as Megatron-LM's validate_args: NCCL_ALGO named (NCCL's all-reduce order),
    then torch.use_deterministic_algorithms(True); megatron-core gets deterministic_mode in its config."""
    choices = ["Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS"]
    if backend == "nccl" and os.environ.get("NCCL_ALGO") not in choices:
        raise UserError(f"--deterministic-mode needs the environment variable NCCL_ALGO set to one of {choices} "
                        f"(as Megatron-LM asks; NCCL_ALGO={os.environ.get('NCCL_ALGO')!r} here)")
    if torch.cuda.is_available() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        # torch's rule for deterministic cuBLAS (else the first matmul raises); NVIDIA's configs set it
        raise UserError("--deterministic-mode on CUDA needs the environment variable CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                        "(or :16:8), as NVIDIA's functional-test configs set it")
    torch.use_deterministic_algorithms(True)


# ---- the trainer --------------------------------------------------------------------------------

class Trainer:
    """Pretrain (and grow) a GPT with megatron-core. Construct inside torchrun (or one process).

    Holds the run's :class:`Components` (config, layout, model, optimizer, scheduler), its
    :class:`TrainState`, the data and the logger. A growth replaces the components as a whole.
    """

    def __init__(self, cfg: Config):
        self.start_time = time.time()  # --exit-duration-in-mins counts setup too, as Megatron's does
        from megatron_staged import runtime
        from megatron_staged.runtime import features

        runtime.install()  # idempotent; the CLI has installed it already
        init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
        self.world_size = dist.get_world_size()
        if cfg.performance.deterministic_mode:
            _deterministic_mode(dist.get_backend())
        saved_state = self._adopt_checkpoint_model_config(cfg)
        validate(cfg, self.world_size)
        print_rank0(features.describe(cfg, features.detect(), dist.get_backend()))
        print_rank0(runtime.summary())
        self.state = TrainState()
        self.tokenizer, self.datasets = prepare_data(cfg, self.world_size)
        set_padded_vocab_size(cfg, self.tokenizer.vocab_size)
        self.stages = StageRunner(cfg, self.world_size, saved_state)  # every stage checked before any build
        self.components = build_components(cfg)
        self.logger = MetricsLogger(cfg)
        if cfg.checkpoint.load:
            self._load(cfg.checkpoint.load)
        self._build_iterators()
        self.fresh_correction = None
        self._apply_fresh_moments()  # resuming a grown checkpoint at its growth iteration

    # the components and the bookkeeping, by the names the logger and tools use
    cfg = property(lambda self: self.components.cfg)
    layout = property(lambda self: self.components.layout)
    model = property(lambda self: self.components.model)
    optimizer = property(lambda self: self.components.optimizer)
    scheduler = property(lambda self: self.components.scheduler)
    iteration = property(lambda self: self.state.iteration)
    consumed_samples = property(lambda self: self.state.consumed_train_samples)
    flops_so_far = property(lambda self: self.state.flops_so_far)
    stage_history = property(lambda self: self.state.stage_history)
    loss_history = property(lambda self: self.state.loss_history)

    # -- setup ------------------------------------------------------------------------------------
    @staticmethod
    def _adopt_checkpoint_model_config(cfg: Config) -> TrainState:
        """On --load, the architecture comes from the checkpoint (flags may only agree with it).

        Returns the checkpoint's training state (empty without --load), for planning the stages.
        """
        if not cfg.checkpoint.load:
            return TrainState()
        from megatron_staged.checkpoint.manager import load_common, resolve_checkpoint_dir

        ckpt_dir, _ = resolve_checkpoint_dir(cfg.checkpoint.load)
        common = load_common(ckpt_dir)
        saved_state = TrainState.from_dict(dict(common.get("train_state", {}), iteration=common.get("iteration", 0)))
        args = common.get("args")
        if not args:
            return saved_state
        saved = Config.from_dict(args).model
        explicit = getattr(cfg, "_explicit", set())
        if saved_state.stage_history:
            # a grown run: the config file still describes the first stage's model
            replaced = sorted(n for n in explicit & GROWN_FIELDS if getattr(cfg.model, n) != getattr(saved, n))
            if replaced:
                its = ", ".join(str(e.get("iteration")) for e in saved_state.stage_history)
                many = "s" if len(saved_state.stage_history) > 1 else ""
                print_rank0(f"note: the checkpoint {ckpt_dir} holds the grown model (growth{many} at iteration{many} {its}): "
                            + ", ".join(f"--{n.replace('_', '-')} {getattr(saved, n)} (given: {getattr(cfg.model, n)})"
                                        for n in replaced)
                            + " -- the given values describe the first stage")
            explicit = explicit - GROWN_FIELDS
        for name, value in vars(saved).items():
            mine = getattr(cfg.model, name)
            if name in explicit and mine != value and name not in NON_ARCHITECTURE_FIELDS:
                raise UserError(f"--{name.replace('_', '-')} {mine} disagrees with the checkpoint "
                                f"{ckpt_dir} ({value}); drop the flag or load a matching checkpoint")
            if name not in explicit:
                if name in ("bf16", "fp16") and mine != value and value:
                    print_rank0(f"note: --{name} taken from the checkpoint {ckpt_dir} (saved by a --{name} run); "
                                f"pass --no-{name} to resume in fp32")
                setattr(cfg.model, name, value)
        if cfg.checkpoint.finetune:
            return TrainState()
        return saved_state

    def _build_iterators(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_staged.data import build_data_iterator

        t = self.cfg.training
        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        train_ds, valid_ds, _ = self.datasets
        # interleaved 1F1B: one iterator per model chunk over the same samples, as Megatron-LM builds them
        iters = [build_data_iterator(train_ds, self.state.consumed_train_samples, t.micro_batch_size,
                                     dpr, dp, num_workers=self.cfg.data.num_workers,
                                     vocab_size=self.cfg.model.padded_vocab_size) for _ in self.model]
        self.train_iter = iters if len(iters) > 1 else iters[0]
        self.valid_ds = valid_ds

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Optional[str]:
        from megatron_staged.checkpoint.manager import save_checkpoint

        c = self.cfg.checkpoint
        if not c.save:
            return None
        t0 = time.time()
        path = save_checkpoint(c.save, self.state.iteration, self.model, self.optimizer, self.scheduler,
                               self.state.to_dict(), self.cfg.to_dict(), save_optimizer=not c.no_save_optim)
        print_rank0(f"saved checkpoint at iteration {self.state.iteration:7d} to {c.save} in {time.time() - t0:.2f}s")
        return path

    def _load(self, path: str) -> None:
        from megatron_staged.checkpoint.manager import load_checkpoint

        from megatron_staged.growth.apply import carry_group_lrs, group_lrs

        c = self.cfg.checkpoint
        finetune = c.finetune
        flags_lrs = group_lrs(self.optimizer)  # the param groups' max/min LR from the flags
        saved = load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                load_optimizer=not (c.no_load_optim or finetune),
                                load_rng=not (c.no_load_rng or finetune))
        if c.override_opt_param_scheduler and self.optimizer is not None and self.scheduler is not None:
            # the optimizer's state brought the checkpoint's max/min LR into its param groups, which the
            # scheduler reads before its own values: the flags' schedule needs the flags' values there too
            carry_group_lrs(flags_lrs, self.optimizer)
            self.scheduler.step(increment=0)
        if not finetune:
            self.state = TrainState.from_dict(saved)
        print_rank0(f"loaded checkpoint {path} at iteration {self.state.iteration} "
                    f"(consumed samples {self.state.consumed_train_samples}, layout now {self.layout})")

    # -- growth -------------------------------------------------------------------------------------
    def grow(self, request: GrowthRequest, stage_index: Optional[int] = None, why: Optional[dict] = None,
             save: bool = True) -> dict:
        """Grow the model and its training state now, and continue on the grown components.

        Prints the eval loss just before and just after, on the same batches. Returns the stage
        history entry. ``why``: what made the stage due (a trigger's reading), for the log and the
        history. Collective.
        """
        if why and why.get("trigger") == "slope":
            self._log_trigger("PRE-GROWTH", why)
        eval_iters = request.eval_iters or self.cfg.training.eval_iters  # 0: no loss check (nan recorded)
        no_eval = ("--eval-iters 0" if not eval_iters else "no validation data" if self.valid_ds is None else None)
        before = self.evaluate(eval_iters)
        old, self.components = self.components, None
        self.components, self.state, stats = self.stages.grow(request, old, self.state, stage_index)
        self._build_iterators()
        self._apply_fresh_moments()
        after = self.evaluate(eval_iters)
        seconds = all_reduce_scalar(stats["seconds"], "max")
        bytes_read = int(all_reduce_scalar(float(stats["bytes_read"]), "sum"))
        e = self.state.stage_history[-1]
        e.update(eval_loss_before=before, eval_loss_after=after, growth_seconds=seconds, bytes_read=bytes_read,
                 stage_index=stage_index, trigger=why)
        self.logger.event(
            f" growth at iteration {self.state.iteration}: {e['operator']} {e['from']['num_layers']} layers x "
            f"{e['from']['hidden_size']} (TP{e['from']['tp']} PP{e['from']['pp']}{_vp(e['from'])}) -> "
            f"{e['to']['num_layers']} layers x {e['to']['hidden_size']} (TP{e['to']['tp']} PP{e['to']['pp']}"
            f"{_vp(e['to'])} DP{e['to']['dp']}) | "
            + (f"eval loss before: {before:.6f} | after: {after:.6f} | diff: {after - before:+.2e} | " if not no_eval
               else f"eval loss check skipped ({no_eval}) | ") +
            f"LR schedule step {e['schedule_step_before']} -> {e['schedule_step_after']} (rho {e['rho']:.3g}, "
            f"re-warmup {e['rewarmup_iters']}) | {seconds:.2f}s",
            event="growth", iteration=self.state.iteration, eval_loss_before=before, eval_loss_after=after,
            num_layers=e["to"]["num_layers"], hidden_size=e["to"]["hidden_size"])
        if save and self.cfg.checkpoint.save:
            self.save()  # the grown state becomes the latest checkpoint of the run
        return e

    def _apply_fresh_moments(self) -> None:
        """Right after a growth (in-run, or resuming a grown checkpoint at its growth iteration),
        install the growth's ``fresh_moments`` rule on the optimizer (growth/fresh_moments.py)."""
        from megatron_staged.growth import fresh_moments

        if self.fresh_correction is not None:
            self.fresh_correction.remove()
            self.fresh_correction = None
        if self.optimizer is not None:  # resumed inside a correction window: the checkpoint's masks
            self.fresh_correction = fresh_moments.resume(self.optimizer)
            if self.fresh_correction is not None:
                print_rank0(f"fresh_moments bias-corrected: resumed the correction of {self.fresh_correction.num_fresh} "
                            f"elements (rank 0) from the checkpoint, {self.fresh_correction.steps} steps after the growth")
                return
        last = self.state.stage_history[-1] if self.state.stage_history else None
        if last is None or last.get("iteration") != self.state.iteration or self.optimizer is None:
            return
        mode = last.get("spec", {}).get("fresh_moments", "zero")
        self.fresh_correction = fresh_moments.apply(self.optimizer, mode)
        if self.fresh_correction is not None:
            print_rank0(f"fresh_moments {mode}: {self.fresh_correction.num_fresh} elements (rank 0) with zero "
                        f"moments are bias-corrected from iteration {self.state.iteration}")

    def _log_trigger(self, what: str, r: dict) -> None:
        self.logger.event(
            f" {what} slope trigger at iteration {self.state.iteration}: slope d log L / d log C = {r['slope']:.4f} "
            f"> {r['threshold']:.4f} (minimum {r['slope_min']:.4f}) | loss {r['loss']:.4f} | "
            f"{r['flops_so_far']:.4e} FLOPs so far",
            event="trigger", kind=what, iteration=self.state.iteration, slope=r["slope"], threshold=r["threshold"],
            loss=r["loss"], flops_so_far=r["flops_so_far"])

    # -- loop -----------------------------------------------------------------------------------------
    @property
    def num_microbatches(self) -> int:
        t = self.cfg.training
        return t.global_batch_size // (t.micro_batch_size * self.layout.dp)

    def train_step(self) -> tuple[float, Optional[float], bool]:
        """One optimizer step; ``ok`` is False when it was not applied (non-finite loss or gradients)."""
        from megatron_staged.training.guards import inject_nan, step_is_finite

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        layer_drop = self.components.layer_drop  # RaPTr / PLD: this step's masks, from (seed, iteration)
        if layer_drop is not None:
            layer_drop.begin_step(self.state.iteration, self.num_microbatches)
        try:
            loss = run_microbatches(self.model, self.train_iter, self.num_microbatches, self.cfg, forward_only=False)
            inject_nan(self.state.iteration + 1, self.model)
            dynamic_loss_scale = self.cfg.model.fp16 and self.cfg.optim.loss_scale is None
            self.step_finite = step_is_finite(loss, self.model, check_grads=not dynamic_loss_scale)
            self.last_num_zeros = None
            if not self.step_finite:
                return loss, float("nan"), False
            ok, grad_norm, num_zeros = self.optimizer.step()
            # --log-num-zeros-in-grad: megatron-core counts them (over the model-parallel group) in step()
            self.last_num_zeros = num_zeros if ok and self.cfg.logging.log_num_zeros_in_grad else None
        finally:
            if layer_drop is not None:
                layer_drop.end_step()
        if ok:
            self.scheduler.step(increment=1)
        return loss, grad_norm, ok

    @torch.no_grad()
    def evaluate(self, eval_iters: Optional[int] = None, dataset=None) -> float:
        """Mean loss over ``eval_iters`` global batches of the validation set (or ``dataset``), from its start."""
        from megatron.core import parallel_state as ps

        from megatron_staged.data import build_data_iterator

        t = self.cfg.training
        n = t.eval_iters if eval_iters is None else eval_iters
        dataset = self.valid_ds if dataset is None else dataset
        if n == 0 or dataset is None:  # --eval-iters 0 or no validation split: no evaluation (Megatron-LM)
            self.last_eval_se = float("nan")
            return float("nan")
        its = [build_data_iterator(dataset, 0, t.micro_batch_size, ps.get_data_parallel_rank(),
                                   ps.get_data_parallel_world_size(), vocab_size=self.cfg.model.padded_vocab_size)
               for _ in self.model]
        it = its if len(its) > 1 else its[0]
        for chunk in self.model:
            chunk.eval()
        losses = [run_microbatches(self.model, it, self.num_microbatches, self.cfg, forward_only=True)
                  for _ in range(n)]
        for chunk in self.model:
            chunk.train()
        mean = sum(losses) / len(losses)
        # sampling noise of the estimate: standard error of the mean over the global batches
        self.last_eval_se = (math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1) / len(losses))
                             if len(losses) > 1 else float("nan"))
        return mean

    def train(self) -> dict:
        """Train to --train-iters (growing at the configured stages); returns a summary."""
        if self.datasets[0] is None:
            from megatron_staged.data.datasets import no_train_data_message

            d = self.cfg.data
            raise UserError(no_train_data_message(d.data_path, d.split))
        for chunk in self.model:
            chunk.train()
        save_interval = self.cfg.checkpoint.save_interval
        self.logger.start(self.state.iteration, self.cfg.training.train_iters)
        t = self.cfg.training
        if t.eval_interval and t.eval_iters and self.valid_ds is None:
            print_rank0(f"note: no validation data (--split {self.cfg.data.split} gives the valid split no share, or no "
                        f"--valid-data-path): no evaluation every --eval-interval {t.eval_interval} iterations")
        exits = ExitConditions(t.exit_signal_handler, t.exit_duration_in_mins, self.start_time)
        try:
            last_loss = self._loop(exits)
        finally:
            exits.close()
        if self.state.iteration >= t.train_iters:
            for line in self.stages.never_ran(self.state, self.cfg):
                print_rank0(line)
        if self.cfg.checkpoint.save and not (save_interval and self.state.iteration % save_interval == 0):
            self.save()
        if self.state.iteration >= t.train_iters and t.eval_iters:
            # Megatron-LM's pretrain() after training (not after an early exit): the validation set, then
            # the test set, --eval-iters batches each ("validation loss at iteration N on test set")
            for split, ds in (("validation", self.valid_ds), ("test", self.datasets[2])):
                if ds is not None:
                    self.logger.final_eval(self, self.evaluate(dataset=ds), split)
        self.logger.close()
        s = self.state
        return {"iteration": s.iteration, "loss": last_loss, "consumed_samples": s.consumed_train_samples,
                "flops_so_far": s.flops_so_far, "stage_history": s.stage_history}

    def _loop(self, exits) -> float:
        save_interval = self.cfg.checkpoint.save_interval
        last_loss = float("nan")
        skipped_in_a_row = 0
        while self.state.iteration < self.cfg.training.train_iters:
            stage, why = self.stages.due(self.state, self.cfg)
            grew = False
            while stage is not None:  # every stage due now, in list order (an at_flops point already
                self.grow(stage.request, stage.index, why, save=False)  # passed grows right after the one before)
                grew = True
                stage, why = self.stages.due(self.state, self.cfg)
            if grew and self.cfg.checkpoint.save:
                self.save()  # the grown state (after every growth due now) becomes the run's latest checkpoint
            cfg, t = self.cfg, self.cfg.training
            layer_drop = self.components.layer_drop
            change = layer_drop.stage_change(self.state.iteration) if layer_drop is not None else None
            if change is not None:
                self.logger.layer_drop_stage(change)
            t0 = time.time()
            loss, grad_norm, ok = self.train_step()
            if self.fresh_correction is not None:
                self.fresh_correction.after_step()
            elapsed = time.time() - t0
            if not self.step_finite:
                skipped_in_a_row += 1
                self._non_finite(loss, skipped_in_a_row)
            else:
                skipped_in_a_row = 0
            if layer_drop is not None:  # executed layers only
                self.last_step_flops = layer_drop.step_flops(cfg.model, t.micro_batch_size, t.global_batch_size)
                self.last_active_layers = layer_drop.active_layers()
            else:
                self.last_step_flops = flops_per_iteration(cfg.model, t.global_batch_size)
                self.last_active_layers = None
            self.state.record_step(loss, t.global_batch_size, self.last_step_flops)
            last_loss = loss
            self.logger.iteration(self, loss, grad_norm, elapsed, ok)
            if t.eval_interval and t.eval_iters and self.valid_ds is not None and \
                    self.state.iteration % t.eval_interval == 0:
                self.logger.eval(self, self.evaluate())
            if save_interval and self.state.iteration % save_interval == 0:
                self.save()
            if t.exit_interval and self.state.iteration % t.exit_interval == 0:
                print_rank0(f"exiting at iteration {self.state.iteration}: --exit-interval {t.exit_interval}")
                break
            optimal = self.stages.optimality_reached(self.state, cfg)
            if optimal is not None:
                self._log_trigger("OPTIMALITY", optimal)
                print_rank0(f"stopping at iteration {self.state.iteration}: further training of this model is "
                            f"no longer compute-optimal (--stop-at-optimality)")
                break
            reason = exits.check()
            if reason:
                print_rank0(f"exiting at iteration {self.state.iteration}: {reason}; saving a checkpoint")
                break
        return last_loss

    def _non_finite(self, loss: float, in_a_row: int) -> None:
        """Skip the step (``--on-non-finite skip``) or save the last good state and stop with one line."""
        t = self.cfg.training
        it = self.state.iteration + 1
        what = f"loss {loss}" if not math.isfinite(loss) else "non-finite gradients"
        if t.on_non_finite == "skip" and in_a_row <= t.max_consecutive_skipped_iterations:
            print_rank0(f"warning: {what} at iteration {it}; step skipped (--on-non-finite skip, {in_a_row} in a row)")
            return
        saved = ""
        if self.cfg.checkpoint.save:
            self.save()  # the step was not applied: this is the last good state
            saved = f"; saved the last good state (iteration {self.state.iteration}) to {self.cfg.checkpoint.save}"
        why = (f"{in_a_row} non-finite steps in a row (--max-consecutive-skipped-iterations "
               f"{t.max_consecutive_skipped_iterations})" if t.on_non_finite == "skip" else f"{what} at iteration {it}")
        raise UserError(f"stopping: {why}{saved}; resume from it with a lower --lr or --clip-grad, or pass "
                        f"--on-non-finite skip to drop such steps")
