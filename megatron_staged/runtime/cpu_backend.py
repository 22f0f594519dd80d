"""Run megatron-core on CPU with the gloo backend, optionally checking GPU device discipline.

megatron-core 0.16 assumes CUDA in a handful of places: tensor factories with ``device='cuda'``
or ``device=torch.cuda.current_device()``, ``.cuda()`` calls, ``param.type()`` compared with
``'torch.cuda.FloatTensor'``, ``torch.cuda.synchronize()``, streams and events, and the CUDA RNG
tracker. :func:`install` redirects exactly those, and only when CUDA is unavailable:

* a ``TorchFunctionMode`` maps every cuda device argument to cpu, makes ``Tensor.cuda()`` a no-op
  and reports CUDA type strings from ``Tensor.type()`` (so dtype checks in the distributed
  optimizer take their normal branch);
* ``torch.cuda.current_device/synchronize/...`` become CPU equivalents;
* the RNG tracker's "cuda" generator is the CPU default generator, so ``fork()`` swaps its state
  the way it swaps the CUDA generator's on GPU (dropout in tensor-parallel regions draws from a
  per-TP-rank stream, as on GPU).

**Strict mode** (``install(strict=True)``, or ``MEGATRON_STAGED_STRICT_DEVICE=1``; the test suite
turns it on) makes CPU runs fail where a GPU run would, although every tensor lives in host
memory. Each tensor carries a placement tag: *device* when it was made on the current device
(a factory given a cuda device or ``torch.cuda.current_device()``, ``.cuda()``, ``.to('cuda')``,
or an op on a device tensor), *host* when made without a device (``torch.zeros(2)``, megatron's
``use_cpu_initialization`` weights, ``.cpu()``), untagged when autograd made it. Then

* an op mixing device tensors with host tensors of more than one element raises
  :class:`DeviceDisciplineError` (CUDA's "Expected all tensors to be on the same device"); the
  cross-device copies CUDA allows (``copy_``, ``to``, ``new_tensor``, indexing) are exempt;
* a collective (``all_reduce``, ``broadcast``, ``all_gather_into_tensor``, send/recv, ...) on a
  host tensor raises (NCCL's "Tensors must be CUDA and dense"); torch's object collectives,
  which choose their own device, are exempt;
* ``Tensor.type()``, ``.is_cuda``, ``.device`` and ``.get_device()`` answer as on GPU for the tag.

:func:`install` / :func:`uninstall` (or the :func:`installed` context manager) are owned by the
entry points (``megatron_staged.cli.main``, ``Trainer``); tests undo the shim with them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref

import torch
from torch.overrides import TorchFunctionMode

STRICT_ENV = "MEGATRON_STAGED_STRICT_DEVICE"
_TAG = "_msd_on_device"  # True: on the current device; False: host; absent: unknown

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

# what install() changes, and why (printed by the entry point; see describe())
PATCHES = (
    "torch function mode: cuda devices -> cpu, Tensor.cuda() no-op, CUDA type strings "
    "(megatron-core allocates with device='cuda'/current_device() and checks param.type())",
    "torch.cuda.{current_device,synchronize,set_device,Stream,Event,get/set_rng_state,manual_seed,...} "
    "-> CPU equivalents (megatron-core calls them unconditionally)",
    "megatron.core.tensor_parallel.random._get/_set_cuda_rng_state -> the CPU generator "
    "(the RNG tracker forks dropout streams per TP rank)",
)
STRICT_PATCHES = (
    "strict: placement tags on tensors; mixed device/host ops and collectives on host tensors raise "
    "DeviceDisciplineError (what CUDA/NCCL would raise)",
    "strict: torch.distributed tensor collectives (and megatron's bound aliases) wrapped to check placement",
    "strict: torch.nn.Parameter keeps its data's placement tag",
)


class DeviceDisciplineError(RuntimeError):
    """A CPU run did something that fails on GPU (host tensor in a collective or mixed with device ones)."""


# ---- placement tags -----------------------------------------------------------------------------

def on_device(t) -> bool | None:
    """The placement tag of a tensor: True (current device), False (host) or None (unknown)."""
    return getattr(t, _TAG, None)


def _tag(t, value) -> None:
    if isinstance(t, torch.Tensor) and value is not None:
        try:
            setattr(t, _TAG, value)
        except (AttributeError, RuntimeError):
            pass


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # an int device index means a CUDA ordinal in torch's factories
    return isinstance(dev, int) and not isinstance(dev, bool)


def _placement_of_device(dev) -> bool | None:
    if dev is None:
        return None
    if _is_cuda_device(dev):
        return True
    if isinstance(dev, (str, torch.device)) and str(dev).startswith("cpu"):
        return False
    return None


def _iter_tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b


def _describe(t) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _alias(t):
    """A new tensor object sharing ``t``'s storage (so it can carry a different tag)."""
    with torch._C.DisableTorchFunction():
        return t.view_as(t) if t.requires_grad else t.detach()


# torch functions that may legally take host tensors alongside device ones on GPU
_CROSS_DEVICE_OK = {
    torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.__setitem__,
    torch.Tensor.__getitem__, torch.Tensor.new_tensor, torch.Tensor.new_empty, torch.Tensor.new_zeros,
    torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.set_, torch.Tensor.type_as,
    torch.Tensor.index_put_, torch.Tensor.index_put, torch.Tensor.record_stream,
    torch._has_compatible_shallow_copy_type,  # nn.Module._apply asks before moving a parameter
}
_DESCRIPTORS = {name: getattr(torch._C.TensorBase, name) for name in ("data", "device", "is_cuda")}


def _descriptor(func):
    """('data'|'device'|'is_cuda', '__get__'|'__set__') for tensor property access, else None."""
    owner = getattr(func, "__self__", None)
    for name, d in _DESCRIPTORS.items():
        if owner is d:
            return name, func.__name__
    return None


class _CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placement to CPU for every torch function call (and tag placements if strict)."""

    def __init__(self, strict: bool):
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return self._backward(func, args, kwargs)
        prop = _descriptor(func)
        if not self.strict:
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                name = func(*args)
                return _CUDA_TYPE.get(name, name)
            if prop == ("is_cuda", "__get__"):
                return True
            a, k = _map_devices(func, args, kwargs)
            return func(*a, **k)
        return self._strict(func, prop, args, kwargs)

    def _backward(self, func, args, kwargs):
        """Run the autograd engine with this mode active. torch pops a mode while its handler runs,
        and activation recomputation runs forward code (``device='cuda'`` factories) inside the
        engine; so the engine is called here, under the mode, as ``torch.autograd.backward`` would."""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        if func is torch.Tensor.backward:
            names = ("gradient", "retain_graph", "create_graph", "inputs")
            call = dict(zip(names, args[1:]), **kwargs)
            tensors, grads = (args[0],), call.get("gradient")
        else:
            names = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
            call = dict(zip(names, args[1:]), **kwargs)
            tensors, grads = args[0], call.get("grad_tensors")
            tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        inputs = call.get("inputs")
        inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        create_graph = bool(call.get("create_graph", False))
        retain_graph = call.get("retain_graph")
        retain_graph = create_graph if retain_graph is None else retain_graph
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
        with self:
            _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                                 allow_unreachable=True, accumulate_grad=True)

    # -- strict mode ------------------------------------------------------------------------------
    def _strict(self, func, prop, args, kwargs):
        if prop is not None:
            name, op = prop
            t = args[0]
            if name == "is_cuda":
                return on_device(t) is True
            if name == "device":
                return torch.device("cuda", 0) if on_device(t) is True else func(*args, **kwargs)
            if name == "data" and op == "__set__":
                func(*args, **kwargs)
                _tag(t, on_device(args[1]))
                return None
            out = func(*args, **kwargs)  # data.__get__
            _tag(out, on_device(t))
            return out
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE.get(name, name) if on_device(args[0]) is not False else name
        if func is torch.Tensor.get_device:
            return 0 if on_device(args[0]) is True else -1
        if func is torch.Tensor.cuda:
            return self._move(args[0], True, lambda: args[0])  # (non_blocking etc. do not matter here)
        if func is torch.Tensor.cpu:
            return self._move(args[0], False, lambda: func(*args, **kwargs))
        if func is torch.Tensor.to:
            target = _to_target(args, kwargs)
            a, k = _map_devices(func, args, kwargs)
            return self._move(args[0], target, lambda: func(*a, **k))

        tensors = list(_iter_tensors(args, kwargs))
        tags = [on_device(t) for t in tensors]
        has_device = any(tag is True for tag in tags)
        if has_device and func not in _CROSS_DEVICE_OK:
            for t, tag in zip(tensors, tags):
                if tag is False and t.dim() > 0:  # CUDA accepts 0-dim CPU scalars
                    raise DeviceDisciplineError(
                        f"{getattr(func, '__name__', func)} mixes a tensor on the current device with a "
                        f"host tensor {_describe(t)}; on GPU this raises 'Expected all tensors to be on "
                        f"the same device' (create it with device=torch.cuda.current_device() or move it)")
        dev_kw = kwargs.get("device")
        a, k = _map_devices(func, args, kwargs)
        out = func(*a, **k)
        if "device" in kwargs:
            tag = _placement_of_device(dev_kw) if dev_kw is not None else (
                True if has_device else False)
        elif has_device:
            tag = True
        elif any(tag is False for tag in tags) or not tensors:
            tag = False
        else:
            tag = None
        inputs = {id(t) for t in tensors}
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and not (id(o) in inputs and on_device(o) is not None):
                _tag(o, tag)
        return out

    @staticmethod
    def _move(t, target, call):
        out = call()
        if target is None:  # a dtype-only .to(): keeps the placement
            target = on_device(t)
            if target is None:
                return out
        if out is t and on_device(t) is not target:
            out = _alias(t)  # on GPU this would be a copy on the other side
        _tag(out, target)
        return out


def _to_target(args, kwargs):
    """Placement requested by ``Tensor.to(...)``: True, False or None (dtype only)."""
    for a in list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]:
        if isinstance(a, torch.Tensor):
            return on_device(a)
        if a is None or isinstance(a, (torch.dtype, bool)):
            continue
        p = _placement_of_device(a)
        if p is not None:
            return p
    return None


def _map_devices(func, args, kwargs):
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs["device"] = "cpu"
    if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
        args = (args[0], "cpu") + tuple(args[2:])
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return args, kwargs


# ---- collectives (strict) -----------------------------------------------------------------------

_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
                       "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
                       "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "gather", "scatter")
_OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                       "send_object_list", "recv_object_list")
_local = threading.local()


_GLOO_GROUPS: "weakref.WeakSet" = None  # groups created with backend="gloo": host tensors are right there


def _group_of(fn, args, kwargs):
    import inspect

    try:
        return inspect.signature(fn).bind_partial(*args, **kwargs).arguments.get("group")
    except (TypeError, ValueError):
        return kwargs.get("group")


def _check_collective(name, args, kwargs, fn=None):
    if not is_strict() or getattr(_local, "in_object_collective", 0):
        return
    group = _group_of(fn, args, kwargs) if fn is not None else None
    if group is not None and _GLOO_GROUPS is not None and group in _GLOO_GROUPS:
        return  # megatron's *_gloo groups (e.g. the optimizer-state gather) take host tensors on GPU too
    for t in _iter_tensors(args, kwargs):
        if on_device(t) is False:
            raise DeviceDisciplineError(
                f"torch.distributed.{name} on a host tensor {_describe(t)}; NCCL needs tensors on the "
                f"current device (create it with device=torch.cuda.current_device())")


def _wrap_collective(name, fn):
    def wrapper(*args, **kwargs):
        _check_collective(name, args, kwargs, fn)
        return fn(*args, **kwargs)
    wrapper.__wrapped__ = fn
    wrapper.__name__ = name
    return wrapper


def _wrap_batch(fn):
    def batch_isend_irecv(p2p_op_list):
        for op in p2p_op_list:
            _check_collective("batch_isend_irecv", (op.tensor,), {})
        return fn(p2p_op_list)
    batch_isend_irecv.__wrapped__ = fn
    return batch_isend_irecv


def _wrap_object_collective(fn):
    def wrapper(*args, **kwargs):
        _local.in_object_collective = getattr(_local, "in_object_collective", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _local.in_object_collective -= 1
    wrapper.__wrapped__ = fn
    wrapper.__name__ = fn.__name__
    return wrapper


def _wrap_new_group(fn):
    def new_group(*args, **kwargs):
        group = fn(*args, **kwargs)
        try:
            import inspect

            backend = inspect.signature(fn).bind_partial(*args, **kwargs).arguments.get("backend")
        except (TypeError, ValueError):
            backend = kwargs.get("backend")
        if backend is not None and str(backend).lower() == "gloo" and group is not None:
            try:
                _GLOO_GROUPS.add(group)
            except TypeError:
                pass
        return group
    new_group.__wrapped__ = fn
    return new_group


def _parameter_new(original):
    def __new__(cls, data=None, requires_grad=True):
        p = original(cls, data, requires_grad)
        if data is not None:
            _tag(p, on_device(data))
        return p
    return __new__


# ---- install / uninstall ------------------------------------------------------------------------

class _Patches:
    """Attribute replacements, undone in reverse order."""

    def __init__(self):
        self.undo: list[tuple[object, str, object]] = []

    def set(self, obj, name, value) -> None:
        # a class attribute is restored as stored (e.g. the staticmethod object, not its function)
        old = vars(obj)[name] if isinstance(obj, type) and name in vars(obj) else getattr(obj, name)
        self.undo.append((obj, name, old))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, old in reversed(self.undo):
            setattr(obj, name, old)
        self.undo.clear()


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


_STATE: dict | None = None


def strict_requested() -> bool:
    return os.environ.get(STRICT_ENV, "").lower() in ("1", "true", "yes", "on")


def install(strict: bool | None = None) -> bool:
    """Install the CPU redirections if CUDA is unavailable; returns True if installed.

    Idempotent (a second call with another ``strict`` keeps the first). ``strict=None`` reads
    ``MEGATRON_STAGED_STRICT_DEVICE``.
    """
    global _STATE
    if _STATE is not None:
        return True
    if torch.cuda.is_available():
        return False
    strict = strict_requested() if strict is None else bool(strict)
    patches = _Patches()
    cuda = torch.cuda
    for name, value in {
        "current_device": lambda: 0, "synchronize": lambda *a, **k: None,
        "empty_cache": lambda *a, **k: None, "set_device": lambda *a, **k: None,
        "device_count": lambda: 0, "Stream": _FakeStream, "Event": _FakeEvent,
        "current_stream": lambda *a, **k: _FakeStream(), "default_stream": lambda *a, **k: _FakeStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(), "max_memory_allocated": lambda *a, **k: 0,
        "memory_allocated": lambda *a, **k: 0, "reset_peak_memory_stats": lambda *a, **k: None,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # megatron calls torch.cuda.manual_seed(data_parallel_seed) for the "cuda" default generator;
        # here that generator is the CPU one, which the caller seeds itself (same on every rank).
        "manual_seed": lambda seed: torch.manual_seed(seed),
    }.items():
        patches.set(cuda, name, value)
    patches.set(cuda.random, "get_rng_state", cuda.get_rng_state)
    patches.set(cuda.random, "set_rng_state", cuda.set_rng_state)
    patches.set(cuda.nvtx, "range_push", lambda *a, **k: None)
    patches.set(cuda.nvtx, "range_pop", lambda *a, **k: None)

    from megatron.core.tensor_parallel import random as mrandom

    patches.set(mrandom, "_get_cuda_rng_state", _cpu_get_rng_state)
    patches.set(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)
    # fork() warns when the CPU generator moves inside it, which on CPU is the point of forking.
    log = logging.getLogger(mrandom.__name__)
    old_level = log.level
    log.setLevel(logging.ERROR)
    if strict:
        _install_strict(patches)
    mode = _CudaToCpuMode(strict)
    mode.__enter__()
    _STATE = {"patches": patches, "mode": mode, "strict": strict, "log": (log, old_level)}
    return True


def _install_strict(patches: _Patches) -> None:
    import sys

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    import weakref

    global _GLOO_GROUPS
    if _GLOO_GROUPS is None:
        _GLOO_GROUPS = weakref.WeakSet()
    replaced = {}
    new_group = _wrap_new_group(c10d.new_group)
    replaced[id(c10d.new_group)] = new_group
    patches.set(c10d, "new_group", new_group)
    patches.set(dist, "new_group", new_group)
    for name in _TENSOR_COLLECTIVES + _OBJECT_COLLECTIVES + ("batch_isend_irecv",):
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        if name == "batch_isend_irecv":
            new = _wrap_batch(fn)
        elif name in _OBJECT_COLLECTIVES:
            new = _wrap_object_collective(fn)
        else:
            new = _wrap_collective(name, fn)
        replaced[id(fn)] = new
        patches.set(c10d, name, new)
        if getattr(dist, name, None) is fn:
            patches.set(dist, name, new)
    # megatron binds some collectives at import (e.g. dist_all_gather_func); rebind those aliases
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("megatron.") or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            if callable(val) and id(val) in replaced:
                patches.set(mod, attr, replaced[id(val)])
    patches.set(torch.nn.Parameter, "__new__", staticmethod(_parameter_new(torch.nn.Parameter.__new__)))


def uninstall() -> None:
    """Undo :func:`install` (no-op if not installed)."""
    global _STATE
    if _STATE is None:
        return
    _STATE["mode"].__exit__(None, None, None)
    _STATE["patches"].restore()
    log, level = _STATE["log"]
    log.setLevel(level)
    _STATE = None


@contextlib.contextmanager
def installed(strict: bool | None = None):
    """``with installed(): ...`` installs for the block and uninstalls after, if it installed."""
    mine = _STATE is None and install(strict)
    try:
        yield is_installed()
    finally:
        if mine:
            uninstall()


def is_installed() -> bool:
    return _STATE is not None


def is_strict() -> bool:
    return bool(_STATE and _STATE["strict"])


def describe() -> list[str]:
    """What is patched now, and why (empty when not installed)."""
    if _STATE is None:
        return []
    return list(PATCHES) + (list(STRICT_PATCHES) if _STATE["strict"] else [])


# the name older callers use
activate = install
