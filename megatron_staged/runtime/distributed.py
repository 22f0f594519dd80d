"""Process groups and seeding.

``init_distributed`` starts torch.distributed (NCCL on GPU, gloo on CPU, one process without
torchrun too) and ``set_parallel_layout`` (re)builds megatron-core's TP/PP/DP groups; a growth that
changes the layout calls it again inside the running job.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_staged.runtime import cpu_backend


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vp: Optional[int] = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B); None: plain

    def __str__(self):
        return f"TP{self.tp} PP{self.pp}" + (f" VP{self.vp}" if self.vp else "") + f" DP{self.dp}"

    def as_dict(self) -> dict:
        """A checkpoint's ``parallel_layout``: tp, pp, dp, and vp only under interleaved 1F1B."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, **({"vp": self.vp} if self.vp else {})}


def resolve_backend(backend: str = "auto") -> str:
    """``--distributed-backend``: ``auto`` is NCCL on GPU and gloo on CPU; NCCL asked for on a machine
    without CUDA (or a torch built without it) is a UserError, not torch's traceback."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        from megatron_staged.errors import UserError

        why = "no CUDA device is available" if not torch.cuda.is_available() else "this torch has no NCCL"
        raise UserError(f"--distributed-backend nccl needs CUDA GPUs, and {why}; use --distributed-backend gloo "
                        f"(or auto: NCCL on GPU, gloo on CPU)")
    return backend


def init_distributed(backend: str = "auto", timeout_minutes: int = 10) -> None:
    """Start torch.distributed once per process (idempotent).

    Entry points install the runtime first (``megatron_staged.runtime.install``); a library caller
    that did not gets it installed here, since megatron-core cannot run on CPU without it.
    """
    from megatron_staged import runtime

    runtime.install()
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = resolve_backend(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_parallel_layout(tp: int, pp: int, vp: Optional[int] = None, gloo_groups: bool = True) -> Layout:
    """(Re)build megatron-core's model-parallel groups for TP x PP (DP = world / (TP*PP)); ``vp``:
    virtual pipeline stages per pipeline rank (interleaved 1F1B), None for plain 1F1B; ``gloo_groups``:
    megatron-core's extra gloo groups (Megatron-LM's --disable-gloo-process-groups turns them off)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vp, create_gloo_process_groups=gloo_groups)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                  ps.get_data_parallel_world_size(), ps.get_virtual_pipeline_model_parallel_world_size())


def set_seed(seed: int) -> None:
    """Seed every generator so that the model, dropout and data are reproducible.

    The CPU generator is seeded identically on every rank (replicated parameters must agree across
    TP ranks); megatron's tracker gets its usual per-TP-rank stream for dropout inside
    tensor-parallel regions. Layout-independent weights come from model.builder, not from here.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    torch.manual_seed(seed)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def current_device() -> torch.device:
    """Where the model, its inputs and every collective's tensors live: the current CUDA device.

    Under the CPU backend ``cuda`` maps to host memory, and strict mode tags what is made here as
    "on the device" (so a tensor made elsewhere fails in a collective, as under NCCL).
    """
    if torch.cuda.is_available() or cpu_backend.is_installed():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live (see :func:`current_device`)."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() != "nccl":
        return torch.device("cpu")  # gloo on a GPU machine (--distributed-backend gloo)
    return current_device()


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    """``value`` reduced over all ranks (``op``: sum, max or min); the value itself without a group."""
    if not dist.is_initialized():
        return float(value)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=ops[op])
    return float(t.item())
