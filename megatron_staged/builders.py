"""The component builders: layout -> seed -> model -> optimizer -> scheduler -> hooks.

One sequence, used by every entry point that needs a model: the trainer, in-run and offline
growth, ``convert`` and the HF tools. :func:`build_components` returns the pieces as one
:class:`Components`; a growth stage hands the trainer a new one instead of editing its fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_staged.config import Config, lr_schedule_steps, virtual_pipeline_size
from megatron_staged.runtime.distributed import Layout, set_parallel_layout, set_seed


@dataclass
class Components:
    """What a training step needs, built for one config at one parallel layout."""
    cfg: Config
    layout: Layout
    model: list                    # this rank's model chunks, wrapped in megatron DDP
    optimizer: Optional[Any] = None
    scheduler: Optional[Any] = None
    layer_drop: Optional[Any] = None   # subnet.LayerDropController when RaPTr / PLD is on


def build_model_chunks(cfg: Config, seed: Optional[int] = None, initialize: bool = True) -> list:
    """This rank's model chunk(s), wrapped in megatron DDP, initialised layout-independently.

    ``initialize=False`` skips the (layout-independent) weight init: the caller fills every tensor
    (a checkpoint load, a growth that derives every tensor from its source).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_staged.model.builder import build_model, init_global_weights

    vp = virtual_pipeline_size(cfg)
    if vp is not None:  # interleaved 1F1B: one chunk per virtual stage, as Megatron-LM's get_model builds them
        models = [build_model(cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                              post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i), vp_stage=i)
                  for i in range(vp)]
    else:
        models = [build_model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())]
    if initialize:
        init_global_weights(models, cfg, cfg.training.seed if seed is None else seed)
    tcfg = models[0].config
    if cfg.model.bf16 or cfg.model.fp16:
        models = [Float16Module(tcfg, model) for model in models]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    # Megatron-LM: bucketing off for chunks after the first (their communication overlaps compute anyway)
    return [DistributedDataParallel(tcfg, ddp_config, model, disable_bucketing=i > 0)
            for i, model in enumerate(models)]


def build_optimizer(cfg: Config, model_chunks, zero_state: bool = True):
    """megatron-core's optimizer (distributed or not) over the chunks, with its state created
    (``zero_state=False``: moments left unwritten, for a caller that writes every element)."""
    from megatron.core.optimizer import OptimizerConfig as MOptConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_staged.checkpoint.manager import init_optimizer_state
    from megatron_staged.training.muon import build_muon_optimizer, is_muon, muon_config_kwargs

    o, m = cfg.optim, cfg.model
    ocfg = MOptConfig(
        optimizer="adam" if is_muon(o.optimizer) else o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad, bf16=m.bf16, fp16=m.fp16, params_dtype=torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # fp16: Megatron-LM's dynamic loss scaling (or a constant --loss-scale); bf16 needs none
        loss_scale=o.loss_scale if m.fp16 else None, initial_loss_scale=o.initial_loss_scale,
        min_loss_scale=o.min_loss_scale, loss_scale_window=o.loss_scale_window, hysteresis=o.hysteresis,
        log_num_zeros_in_grad=cfg.logging.log_num_zeros_in_grad,
    )
    if is_muon(o.optimizer):  # megatron's Muon builder chains its Adam config for the other parameters
        for k, v in muon_config_kwargs(o).items():
            setattr(ocfg, k, v)
        optimizer = build_muon_optimizer(ocfg, model_chunks, layer_wise=o.optimizer == "dist_muon",
                                         use_gloo_process_groups=cfg.parallel.enable_gloo_process_groups)
    else:
        optimizer = get_megatron_optimizer(ocfg, model_chunks,
                                           use_gloo_process_groups=cfg.parallel.enable_gloo_process_groups)
    init_optimizer_state(optimizer, zero=zero_state)
    return optimizer


def wire_schedule_hooks(model_chunks, optimizer, cfg: Config) -> None:
    """What Megatron-LM's training loop sets on the model config before the schedules run."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.timers = None
    if cfg.parallel.overlap_grad_reduce:  # Megatron-LM: one per chunk under interleaved 1F1B
        config.no_sync_func = [c.no_sync for c in model_chunks] if len(model_chunks) > 1 else model_chunks[0].no_sync
    if cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer:
        config.param_sync_func = ([c.start_param_sync for c in model_chunks] if len(model_chunks) > 1
                                  else model_chunks[0].start_param_sync)


def build_components(cfg: Config, *, initialize: bool = True, with_optimizer: bool = True,
                     with_scheduler: bool = True, zero_optimizer_state: bool = True) -> Components:
    """Set the parallel layout of ``cfg`` and build model, optimizer and LR scheduler on it.
    ``zero_optimizer_state=False``: the Adam moments are allocated but not written (the caller
    writes every element: a growth's target).

    Collective (process groups are rebuilt). The seed is reset first, so the same config gives the
    same components whatever ran before in the process.
    """
    from megatron_staged.training.lr import build_scheduler

    layout = set_parallel_layout(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                                 virtual_pipeline_size(cfg), gloo_groups=cfg.parallel.enable_gloo_process_groups)
    set_seed(cfg.training.seed)
    model = build_model_chunks(cfg, initialize=initialize)
    optimizer = build_optimizer(cfg, model, zero_state=zero_optimizer_state) if with_optimizer else None
    scheduler = None
    if optimizer is not None:
        if with_scheduler:
            scheduler = build_scheduler(optimizer, cfg.optim, cfg.training.train_iters,
                                        override=cfg.checkpoint.override_opt_param_scheduler,
                                        steps=lr_schedule_steps(cfg))
        wire_schedule_hooks(model, optimizer, cfg)
    comps = Components(cfg=cfg, layout=layout, model=model, optimizer=optimizer, scheduler=scheduler)
    from megatron_staged.subnet import attach_layer_drop

    comps.layer_drop = attach_layer_drop(comps)
    return comps
