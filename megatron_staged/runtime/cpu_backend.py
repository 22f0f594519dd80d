"""Run megatron-core on CPU with the gloo backend.

megatron-core 0.16 assumes CUDA in a handful of places: tensor factories with ``device='cuda'``
or ``device=torch.cuda.current_device()``, ``.cuda()`` calls, ``param.type()`` compared with
``'torch.cuda.FloatTensor'``, ``torch.cuda.synchronize()``, streams and events, and the CUDA RNG
tracker. This module redirects exactly those, and only when CUDA is unavailable:

* a ``TorchFunctionMode`` maps every cuda device argument to cpu, makes ``Tensor.cuda()`` a no-op
  and reports CUDA type strings from ``Tensor.type()`` (so dtype checks in the distributed
  optimizer take their normal branch);
* ``torch.cuda.current_device/synchronize/...`` become CPU equivalents;
* the RNG tracker's "cuda" generator is the CPU default generator, so ``fork()`` swaps its state
  the way it swaps the CUDA generator's on GPU (dropout in tensor-parallel regions draws from a
  per-TP-rank stream, as on GPU).

Call :func:`activate` once per process before building anything. It is idempotent.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_MODE = None

_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # an int device index means a CUDA ordinal in torch's factories
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placement to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE.get(name, name)
        if func is torch.Tensor.is_cuda.__get__:
            return True
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and len(args) > 1 and (
            _is_cuda_device(args[1]) and not isinstance(args[1], bool)
        ):
            args = (args[0], "cpu") + tuple(args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return _FakeEvent()

    def wait_event(self, *a, **k):
        pass


class _FakeEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def activate() -> bool:
    """Install the CPU redirections if CUDA is unavailable. Returns True if active."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.Stream = _FakeStream
    cuda.Event = _FakeEvent
    cuda.current_stream = lambda *a, **k: _FakeStream()
    cuda.default_stream = lambda *a, **k: _FakeStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # megatron calls torch.cuda.manual_seed(data_parallel_seed) for the "cuda" default generator;
    # here that generator is the CPU one, which the caller seeds itself (same on every rank).
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    try:
        cuda.nvtx.range_push = lambda *a, **k: None
        cuda.nvtx.range_pop = lambda *a, **k: None
    except AttributeError:
        pass

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    # fork() warns when the CPU generator moves inside it, which on CPU is the point of forking.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE
