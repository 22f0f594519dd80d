"""Layer dropping inside megatron-core, through its extension points.

* :class:`SubnetTransformerLayer` is megatron's ``TransformerLayer`` put into the layer spec in its
  place (``ModuleSpec.module``). Its forward asks the run's :class:`LayerDropController` whether
  it runs for the current micro-batch; a dropped layer returns its input (an identity on the
  residual stream), so neither its forward nor its backward is computed and its parameters get
  no gradient.
* A forward pre-hook on each ``GPTModel`` chunk counts that chunk's micro-batches (a chunk runs its
  micro-batches in order, also under interleaved 1F1B, which only interleaves the chunks); a forward hook on the
  ``TransformerBlock`` copies the input when a pipeline stage's every layer was dropped (megatron's
  schedules must not see the received tensor returned as the stage's output).
* ``config.finalize_model_grads_func`` (megatron's hook at the end of a step's backward) is wrapped
  so that, with ``--overlap-grad-reduce``, the grad buckets holding dropped layers are marked ready
  and their collectives launched (megatron would otherwise assert that they never were).
* A step pre/post hook on the torch optimizer inside megatron's optimizer hides the gradient of
  parameters that got none this step, so AdamW leaves them, and their moments, untouched
  (``--no-layer-drop-skip-optimizer-update`` to let momentum and weight decay move them).

Nothing here talks to other ranks: the masks are functions of (seed, iteration, micro-batch).
"""
from __future__ import annotations

import collections
from typing import Optional

import torch

from megatron_staged.subnet.schedule import LayerDropSchedule


def _transformer_layer_cls():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class SubnetTransformerLayer(TransformerLayer):
        """megatron's TransformerLayer, skipped when the run's layer-drop mask says so.

        ``x <- x + zeta_l * c * f_l(x)`` with ``f_l(x) = layer(x) - x`` (the layer's whole residual
        contribution); ``zeta_l = 0`` returns ``x`` without running the layer.
        """

        subnet_controller = None  # set by LayerDropController.attach

        def forward(self, *args, **kwargs):
            ctl = self.subnet_controller
            if ctl is None or not self.training or not ctl.in_step:
                return super().forward(*args, **kwargs)
            if getattr(self.config, "recompute_granularity", None) == "full":
                keep, scale = ctl.decide_recomputed(self.layer_number)
            else:
                keep, scale = ctl.decide(self.layer_number)
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if not keep:
                return hidden, kwargs.get("context")
            out, context = super().forward(*args, **kwargs)
            if scale != 1.0:
                out = hidden + scale * (out - hidden)
            return out, context

    return SubnetTransformerLayer


_LAYER_CLS = None


def subnet_layer_class():
    global _LAYER_CLS
    if _LAYER_CLS is None:
        _LAYER_CLS = _transformer_layer_cls()
    return _LAYER_CLS


def subnet_layer_spec(spec):
    """The same layer spec with megatron's TransformerLayer replaced by SubnetTransformerLayer."""
    import dataclasses

    return dataclasses.replace(spec, module=subnet_layer_class())


class LayerDropController:
    """Per-step masks for one model replica; consulted by every SubnetTransformerLayer."""

    def __init__(self, schedule: LayerDropSchedule, dp_rank: int, dp_size: int, skip_optimizer_update: bool):
        self.schedule = schedule
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.skip_optimizer_update = skip_optimizer_update
        self.in_step = False
        self.iteration = 0
        self.micro_batch = -1           # local index of the micro-batch being run
        self._chunk_micro_batches: list[int] = []  # the same, per model chunk (interleaved 1F1B)
        self._recompute_queue: dict = {}  # layer number -> decisions awaiting recomputation (FIFO)
        self._param_gather_done: list[bool] = []  # per chunk: dropped buckets' all-gathers finished this step
        self.masks: list[torch.Tensor] = []
        self.scale = torch.ones(schedule.num_layers, dtype=torch.float64)
        self.layer_params: dict[int, list] = {}   # global layer number -> this rank's params
        self.no_grad_layers: set[int] = set()
        self.forced: Optional[torch.Tensor] = None  # tests: one mask for every micro-batch
        self._announced = "nothing yet"             # the RaPTr stage last logged (None: past the schedule)

    # -- per step ----------------------------------------------------------------------------------
    def begin_step(self, iteration: int, local_micro_batches: int) -> None:
        """Draw the masks of step ``iteration`` (0-based) for every global micro-batch."""
        self.iteration = iteration
        self.micro_batch = -1
        self._chunk_micro_batches = [-1] * len(self._chunk_micro_batches)
        self._param_gather_done = [False] * len(self._chunk_micro_batches)
        self._recompute_queue = {}
        if self.forced is not None:
            self.masks = [self.forced.clone()]
        else:
            self.masks = self.schedule.masks_of_step(iteration, local_micro_batches * self.dp_size)
        self.scale = self.schedule.scale(iteration)
        kept_somewhere = torch.stack(self.masks).any(0)
        self.no_grad_layers = {l + 1 for l in range(self.schedule.num_layers) if not kept_somewhere[l]}
        self.in_step = True

    def end_step(self) -> None:
        self.in_step = False

    def current_mask(self) -> torch.Tensor:
        if len(self.masks) == 1:
            return self.masks[0]
        return self.masks[max(self.micro_batch, 0) * self.dp_size + self.dp_rank]

    def decide(self, layer_number: int) -> tuple[bool, float]:
        keep = bool(self.current_mask()[layer_number - 1])
        return keep, float(self.scale[layer_number - 1])

    def decide_recomputed(self, layer_number: int) -> tuple[bool, float]:
        """``decide`` for a layer under ``--recompute-granularity full``: megatron's checkpoint runs
        the layer once without grad in forward and again in backward, when later micro-batches have
        run their forwards (1F1B) and ``micro_batch`` has moved on. So the first pass queues its
        decision and the recomputation takes it back; a layer's backwards come in the order of its
        forwards (1F1B, interleaved or not, and no pipelining alike)."""
        queue = self._recompute_queue.setdefault(layer_number, collections.deque())
        if not torch.is_grad_enabled():  # the checkpointed forward
            d = self.decide(layer_number)
            queue.append(d)
            return d
        if queue:  # its recomputation in backward
            return queue.popleft()
        return self.decide(layer_number)  # a layer outside the recomputed ones (--recompute-num-layers)

    def active_layers(self) -> float:
        """Mean number of layers run per micro-batch in the current step (all replicas)."""
        return float(torch.stack(self.masks).sum(1).double().mean())

    def step_flops(self, model_cfg, micro_batch_size: int, global_batch_size: int) -> float:
        """Model FLOPs of the step, counting executed layers only (every global micro-batch)."""
        from megatron_staged.training.flops import flops_per_iteration

        if len(self.masks) == 1:
            return flops_per_iteration(model_cfg, global_batch_size, num_layers=int(self.masks[0].sum()))
        return sum(flops_per_iteration(model_cfg, micro_batch_size, num_layers=int(m.sum())) for m in self.masks)

    def stage_change(self, iteration: int) -> Optional[dict]:
        """A record when step ``iteration`` starts a RaPTr stage, or is the first step of this
        process (a resumed or grown run says where it stands); None otherwise."""
        s = self.schedule
        if s.method != "raptr":
            return None
        cur = s.stage_index(iteration)
        if self._announced == cur:
            return None
        self._announced = cur
        if cur is None:
            return {"event": "raptr_stage", "iteration": iteration, "stage": len(s.stages), "of": len(s.stages),
                    "keep_prob": 1.0, "expected_active_layers": float(s.num_layers), "num_layers": s.num_layers,
                    "until": None}
        st = s.stages[cur]
        return {"event": "raptr_stage", "iteration": iteration, "stage": cur, "of": len(s.stages),
                "keep_prob": st.keep_prob, "expected_active_layers": st.expected_active,
                "num_layers": s.num_layers, "until": st.start + st.iters}

    # -- wiring ------------------------------------------------------------------------------------
    def attach(self, model_chunks, optimizer, overlap_grad_reduce: bool) -> None:
        """Hook this controller into the model chunks, megatron's schedule config and the optimizer."""
        from megatron.core.utils import get_model_config

        from megatron_staged.model.builder import unwrap

        layer_cls = subnet_layer_class()
        self._chunk_micro_batches = [-1] * len(model_chunks)
        self._param_gather_done = [False] * len(model_chunks)
        for index, chunk in enumerate(model_chunks):
            gpt = unwrap(chunk)
            gpt.register_forward_pre_hook(self._micro_batch_counter(index))
            ddp = getattr(chunk, "ddp_config", None)
            if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
                gpt.register_forward_hook(self._param_gather_finisher(index, chunk))
            gpt.decoder.register_forward_hook(_pass_through_copy)
            for mod in gpt.modules():
                if isinstance(mod, layer_cls):
                    mod.subnet_controller = self
                    self.layer_params.setdefault(mod.layer_number, []).extend(mod.parameters())
        if overlap_grad_reduce:
            config = get_model_config(model_chunks[0])
            finalize = config.finalize_model_grads_func
            config.finalize_model_grads_func = self._finalize_wrapper(finalize, model_chunks)
        if optimizer is not None and self.skip_optimizer_update:
            self._hook_optimizer(optimizer)

    def _micro_batch_counter(self, index: int):
        """Pre-hook of model chunk ``index``: its k-th forward of a step is micro-batch k. Under
        interleaved 1F1B the schedule alternates between chunks, but each chunk still runs the
        micro-batches in order, and a chunk's layers run right after its pre-hook (no recompute)."""
        def count(module, args):
            self._chunk_micro_batches[index] += 1
            self.micro_batch = self._chunk_micro_batches[index]

        return count

    def _param_gather_finisher(self, index: int, chunk):
        """With --overlap-param-gather, megatron waits for a bucket's parameter all-gather (and starts
        the next one's) in the forward pre-hook of a module holding its parameters; a bucket whose
        layers were all dropped is never waited for, and the next step's dispatch asserts that no
        all-gather is outstanding (or, never dispatched, its parameters would stay stale on the ranks
        that do not own their shard). After the first forward of each chunk in a step, finish every
        such bucket, in megatron's all-gather order (its bucket groups reversed), the same on every
        DP rank."""
        def finish(module, args, output):
            if not self.in_step or self._param_gather_done[index]:
                return
            self._param_gather_done[index] = True
            for groups in (chunk.bucket_groups, chunk.expert_parallel_bucket_groups):
                for group in reversed(groups):
                    if group.param_gather_handle is not None or not group.param_gather_dispatched:
                        group.finish_param_sync()

        return finish

    def _finalize_wrapper(self, finalize, model_chunks):
        def finalize_with_dropped_layers(*args, **kwargs):
            if self.in_step:
                mark_dropped_params_ready(model_chunks, self.params_without_grad_in_last_micro_batch())
            return finalize(*args, **kwargs)

        return finalize_with_dropped_layers

    def params_without_grad_in_last_micro_batch(self) -> set:
        last = self.current_mask()
        return {id(p) for l, ps in self.layer_params.items() if not bool(last[l - 1]) for p in ps}

    # -- optimizer: parameters without gradient keep their value and moments --------------------------
    def _hook_optimizer(self, optimizer) -> None:
        model_to_main = {}
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            for model_p, main_p in _model_main_pairs(opt):
                model_to_main[id(model_p)] = main_p
            inner = opt.optimizer
            hidden: list = []

            def pre(inner_opt, args, kwargs, hidden=hidden):
                hidden.clear()
                if not self.in_step:
                    return
                for l in self.no_grad_layers:
                    for p in self.layer_params.get(l, []):
                        main = model_to_main.get(id(p))
                        if main is not None and main.grad is not None:
                            hidden.append((main, main.grad))
                            main.grad = None  # torch's Adam/SGD skip a parameter whose grad is None

            def post(inner_opt, args, kwargs, hidden=hidden):
                for main, g in hidden:
                    main.grad = g
                    # the step count stays common to all parameters (checkpoints hold one step, and
                    # megatron's distributed optimizer asserts it); only value and moments stand still
                    st = inner_opt.state.get(main)
                    if st and "step" in st:
                        st["step"] += 1
                hidden.clear()

            inner.register_step_pre_hook(pre)
            inner.register_step_post_hook(post)


def _model_main_pairs(opt):
    """(model parameter, the tensor the torch optimizer updates for it) for a megatron optimizer."""
    if hasattr(opt, "shard_fp32_groups"):  # DistributedOptimizer: this rank's fp32 shards
        for model_g, main_g in zip(opt.model_fp32_groups, opt.shard_fp32_groups):
            yield from zip(model_g, main_g)
        for model_g, main_g in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
            yield from zip(model_g, main_g)
    elif hasattr(opt, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
        for model_g, main_g in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            yield from zip(model_g, main_g)
        for g in opt.fp32_from_fp32_groups:
            for p in g:
                yield p, p
    else:  # FP32Optimizer: the model parameters themselves
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                yield p, p


def mark_dropped_params_ready(model_chunks, dropped: set) -> None:
    """With --overlap-grad-reduce, register parameters whose hook never fired as ready.

    megatron launches a bucket's collective when every parameter in it has reported its gradient
    in the last micro-batch (as often as in the first step, its "golden" counts) and asserts in
    ``finish_grad_sync`` that it was launched. A dropped layer reports nothing, so its buckets are
    completed here, in megatron's bucket order; every DP replica drops the same layers (masks are
    drawn per iteration), so the collectives are issued in the same order on every replica.
    """
    for chunk in model_chunks:
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            if not group.is_last_microbatch:
                continue
            for param in list(group.params):
                if id(param) not in dropped or param in group.per_param_grad_ready_counts:
                    continue
                times = 1 if group.is_first_batch else group.golden_per_param_grad_ready_counts.get(param, 1)
                for _ in range(times):
                    group.register_grad_ready(param)


def _pass_through_copy(block, args, output):
    """A pipeline stage whose every layer was dropped returns a copy of the tensor it received."""
    if block.pre_process or not isinstance(output, torch.Tensor):
        return None
    inp = getattr(block, "input_tensor", None)
    if inp is not None and output.data_ptr() == inp.data_ptr():
        return output.clone()
    return None
