"""Muon (``--optimizer muon`` / ``dist_muon``): megatron-core's Muon on 2-D hidden weights, Adam on the rest.

megatron-core 0.16.1 ships the optimizer (``megatron.core.optimizer.muon``): its builder
``get_megatron_muon_optimizer`` chains ``TensorParallelMuon`` (on every 2-D weight that is not an
embedding or the output layer) with megatron's ordinary Adam (on embeddings, the output layer,
norms and biases), the way Megatron-LM's ``--optimizer muon`` does. ``dist_muon`` wraps the same
chain in megatron's ``LayerWiseDistributedOptimizer`` (each DP rank updates whole parameters, then
all-gathers them). megatron-core refuses Muon with ``--use-distributed-optimizer`` (the
distributed optimizer shards flat buffer ranges, and Newton-Schulz needs whole matrices); so does
this project, in config validation, naming ``dist_muon``.

The Newton-Schulz iteration itself lives in NVIDIA's ``emerging-optimizers`` package. megatron-core
0.16.1 was written against its v0.1.0 (a git tag, never published to the package registry); the
registry has 0.3.0 only, which declares Python >= 3.12, imports triton unconditionally, and renamed
two arguments. The adaptations, all here:

- for the import only, ``typing.override`` (Python 3.12) is lent from ``typing_extensions`` on
  Python 3.11, and without triton an empty ``triton_kernels`` module stands in (see
  :func:`_importable_on_cpu_py311`);
- :class:`TensorParallelMuon` re-does only the constructor of megatron's class for the 0.3 API
  (``nesterov`` for ``use_nesterov``, ``newton_schulz_tp(tp_mode=...)`` for ``mode=``), keeping
  megatron's ``orthogonalize`` (QKV split, TP group choice) as it is; megatron's builder uses it
  while :func:`build_muon_optimizer` runs.

Two fixes to megatron-core's ``LayerWiseDistributedOptimizer`` (``dist_muon``), which had only
run in bf16 on NCCL (:func:`_layer_wise_class`): its all-gather of the updated parameters sends
unequal sizes per rank, which gloo refuses; and its checkpoint dict assumed bf16's wrappers.

Update of one Muon parameter W (m x n) with gradient G, per step (decoupled weight decay)::

    W <- W * (1 - lr * wd)
    M <- beta * M + (1 - beta) * G                 (momentum_buffer; Nesterov: use G + beta*(M - G))
    W <- W - lr * extra_scale * sqrt(max(m, n)) * NS5(M)     ("spectral" scale mode)

where NS5 is five quintic Newton-Schulz steps on M / ||M||_F (approximately U V^T of M = U S V^T).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Any, Optional

import torch

from megatron_staged.errors import UserError

MUON_OPTIMIZERS = ("muon", "dist_muon")
INSTALL = ("pip install --ignore-requires-python 'emerging-optimizers==0.3.0' (Python 3.11; on >= 3.12: "
           "pip install -e '.[muon]')")


def is_muon(name: str) -> bool:
    return name in MUON_OPTIMIZERS


@contextlib.contextmanager
def _importable_on_cpu_py311():
    """What emerging-optimizers 0.3 needs to import here, lent for the import only.

    - ``typing.override`` (Python 3.12; a no-op decorator): ``typing_extensions``' on 3.11.
    - ``triton`` (a GPU kernel compiler, ~290 MB, not a declared dependency): the package imports
      its Triton SYRK kernels unconditionally; without triton, an empty ``triton_kernels`` stands
      in with ``HAS_TRITON_340 = False``, so the kernels' only user (``use_syrk=True``, which
      megatron never sets) asserts instead of the whole package failing to import. The stand-in
      stays registered: the package's modules hold a reference to it.
    """
    import sys
    import types
    import typing

    lent = not hasattr(typing, "override")
    if lent:
        from typing_extensions import override

        typing.override = override
    if importlib.util.find_spec("triton") is None and "emerging_optimizers.triton_kernels" not in sys.modules:
        stand_in = types.ModuleType("emerging_optimizers.triton_kernels")
        stand_in.HAS_TRITON_340 = False
        sys.modules[stand_in.__name__] = stand_in
    try:
        yield
    finally:
        if lent:
            del typing.override


def megatron_muon_module():
    """``megatron.core.optimizer.muon`` with emerging-optimizers loaded, or a one-line UserError."""
    with _importable_on_cpu_py311():
        try:
            importlib.import_module("emerging_optimizers.orthogonalized_optimizers")
        except ImportError as e:
            raise UserError(f"--optimizer muon needs the emerging-optimizers package ({e}); install it: {INSTALL}") \
                from None
        module = importlib.import_module("megatron.core.optimizer.muon")
        if not module.HAVE_EMERGING_OPTIMIZERS:  # imported earlier, before the package was importable
            module = importlib.reload(module)
    return module


def _compat_class(mmuon):
    """megatron's TensorParallelMuon with a constructor for emerging-optimizers 0.3."""
    from emerging_optimizers.orthogonalized_optimizers import OrthogonalizedOptimizer, get_muon_scale_factor
    from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz_tp
    from megatron.core.utils import get_pg_size

    class TensorParallelMuon(mmuon.TensorParallelMuon):
        """megatron-core 0.16.1's ``TensorParallelMuon`` (same arguments, same ``orthogonalize``)."""

        def __init__(self, params, lr: float = 3e-4, momentum_beta: float = 0.95, use_nesterov: bool = True,
                     weight_decay: float = 0.01, use_decoupled_weight_decay: bool = True, split_qkv: bool = False,
                     is_qkv_fn=None, qkv_split_shapes=None, fp32_matmul_prec: str = "medium",
                     coefficient_type: str = "quintic", num_ns_steps: int = 5, scale_mode: str = "spectral",
                     extra_scale_factor: float = 1.0, pg_collection=None, mode: str = "duplicated") -> None:
            if num_ns_steps < 1:
                raise ValueError(f"num_ns_steps must be at least 1, got {num_ns_steps}")

            def scaled_orthogonalize_fn(grad: torch.Tensor, tp_group, partition_dim: Optional[int] = None):
                size = [grad.size(-2), grad.size(-1)]
                if partition_dim is not None:
                    size[partition_dim] *= get_pg_size(tp_group)
                orth = newton_schulz_tp(grad, steps=num_ns_steps, coefficient_type=coefficient_type,
                                        tp_group=tp_group, partition_dim=partition_dim,
                                        tp_mode="duplicated" if mode == "blockwise" else mode)
                return orth * get_muon_scale_factor(size[0], size[1], mode=scale_mode) * extra_scale_factor

            self.pg_collection = pg_collection
            self.mode = mode
            self.split_qkv = split_qkv
            self.is_qkv_fn = is_qkv_fn
            self.qkv_split_shapes = qkv_split_shapes
            OrthogonalizedOptimizer.__init__(
                self, params, lr, momentum_beta, weight_decay, nesterov=use_nesterov,
                weight_decay_method="decoupled" if use_decoupled_weight_decay else "l2",
                fp32_matmul_prec=fp32_matmul_prec, scaled_orthogonalize_fn=scaled_orthogonalize_fn)

    return TensorParallelMuon


def _layer_wise_class(mmuon):
    """megatron's LayerWiseDistributedOptimizer, whose parameter all-gather also runs on gloo."""
    from megatron.core.utils import get_pg_rank
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    class LayerWiseDistributedOptimizer(mmuon.LayerWiseDistributedOptimizer):
        """Two fixes to megatron-core's, which was only run with bf16 on NCCL:

        * after the step, each DP rank sends the parameters it updated to the others. megatron
          all-gathers each rank's own number of elements, which NCCL accepts and gloo refuses
          ("invalid tensor size"); on gloo every rank's part is padded to the largest and trimmed.
        * ``sharded_state_dict`` reads each part as a Float16 wrapper's ``{"optimizer": ...}``; in
          fp32 the parts are ``FP32Optimizer``\ s, whose dict is the torch one: the same
          post-processing is applied to that.
        """

        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
            if self.config.bf16 or self.config.fp16:
                return super().sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
            sharded = mmuon.ChainedOptimizer.sharded_state_dict(self, model_sharded_state_dict, is_loading, **kwargs)
            _same_replica_over_dp(sharded)
            parts = {0: sharded} if len(self.chained_optimizers) == 1 else sharded
            for sd in parts.values():
                _share_param_group_metadata(sd)
            return sharded

        @torch.no_grad()
        def allgather_params(self) -> None:
            groups = [] if self.pg_collection is None else [
                (self.dp_cp_params_list, self.pg_collection.dp_cp),
                (self.expt_dp_params_list, self.pg_collection.expt_dp)]
            if not any(params for params, _ in groups) or \
                    torch.distributed.get_backend(self.pg_collection.dp_cp) != "gloo":
                return super().allgather_params()
            for params_list, group in groups:
                if params_list:
                    _padded_allgather(params_list, group, get_pg_rank(group))

    def _same_replica_over_dp(sharded) -> None:
        """Each parameter's state lives on one DP rank only: every copy is the main replica over DP."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values

        for sh in nested_values(sharded):
            if hasattr(sh, "replica_id"):
                sh.replica_id = 0 if isinstance(sh.replica_id, int) else (*sh.replica_id[:2], 0)

    def _share_param_group_metadata(sd) -> None:
        """An empty local state is not saved, and a group's hyperparameters (saved once) are taken
        from a rank that holds parameters of it (megatron's own handling, on a torch state dict)."""
        from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

        if not sd["state"]:
            sd["state"] = LocalNonpersistentObject(sd["state"])
        for i, group in enumerate(sd["param_groups"]):
            local_params = group.pop("params")
            group["params"] = bool(local_params.unwrap())
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, group)
            chosen = next((g for g in everyone if g["params"]), group)
            chosen["params"] = local_params
            sd["param_groups"][i] = chosen

    def _padded_allgather(params_list, group, rank) -> None:
        like = next(p for params in params_list for p in params)
        sizes = [sum(p.numel() for p in params) for params in params_list]
        mine = torch.zeros(max(sizes), device=like.device, dtype=like.dtype)
        if sizes[rank]:
            mine[:sizes[rank]].copy_(_flatten_dense_tensors(params_list[rank]))
        gathered = [torch.empty_like(mine) for _ in params_list]
        torch.distributed.all_gather(gathered, mine, group=group)
        for i, (flat, params) in enumerate(zip(gathered, params_list)):
            if params and i != rank:
                for new, p in zip(_unflatten_dense_tensors(flat[:sizes[i]], params), params):
                    p.data.copy_(new)

    return LayerWiseDistributedOptimizer


@contextlib.contextmanager
def _megatron_builds_with(mmuon, **classes):
    """Let megatron's Muon builder instantiate these classes under megatron's names, for this call only."""
    originals = {name: getattr(mmuon, name) for name in classes}
    for name, cls in classes.items():
        setattr(mmuon, name, cls)
    try:
        yield
    finally:
        for name, cls in originals.items():
            setattr(mmuon, name, cls)


def muon_param_names(model_chunks) -> list[str]:
    """Names of the parameters megatron's Muon builder gives to Muon (2-D, not embedding/output)."""
    return [n for c in model_chunks for n, p in c.named_parameters()
            if p.requires_grad and p.dim() == 2 and not getattr(p, "is_embedding_or_output_parameter", False)]


def tag_embeddings(model_chunks) -> None:
    """Mark learned position embeddings as an embedding, as megatron marks the word embeddings.

    megatron-core tags only ``word_embeddings`` and ``output_layer`` with
    ``is_embedding_or_output_parameter``; the learned position table (GPT-2) is 2-D too, and would
    otherwise be given to Muon. It is a lookup table, not a hidden linear map: it goes to Adam.
    """
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if name.endswith("position_embeddings.weight"):
                p.is_embedding_or_output_parameter = True


def build_muon_optimizer(ocfg, model_chunks, *, layer_wise: bool, use_gloo_process_groups: bool = True):
    """megatron-core's Muon + Adam chain over the chunks (``layer_wise``: ``dist_muon``)."""
    mmuon = megatron_muon_module()
    tag_embeddings(model_chunks)
    if not muon_param_names(model_chunks):
        # a zero-layer model (embeddings, final norm, output layer): nothing for Muon, all Adam. Its
        # expansion builds the Muon chain, and the new layers' momentum starts at zero (not in the source)
        from megatron.core.optimizer import get_megatron_optimizer

        return get_megatron_optimizer(ocfg, model_chunks, use_gloo_process_groups=use_gloo_process_groups)
    with _megatron_builds_with(mmuon, TensorParallelMuon=_compat_class(mmuon),
                               LayerWiseDistributedOptimizer=_layer_wise_class(mmuon)):
        return mmuon.get_megatron_muon_optimizer(ocfg, model_chunks, layer_wise_distributed_optimizer=layer_wise,
                                                 use_gloo_process_groups=use_gloo_process_groups)


def muon_config_kwargs(o) -> dict[str, Any]:
    """megatron-core OptimizerConfig fields for the Muon flags of ``cfg.optim``."""
    return dict(muon_momentum=o.muon_momentum, muon_split_qkv=o.muon_split_qkv,
                muon_use_nesterov=o.muon_use_nesterov, muon_scale_mode=o.muon_scale_mode,
                muon_fp32_matmul_prec=o.muon_fp32_matmul_prec, muon_num_ns_steps=o.muon_num_ns_steps,
                muon_tp_mode=o.muon_tp_mode, muon_extra_scale_factor=o.muon_extra_scale_factor)
