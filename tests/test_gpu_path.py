"""The GPU path, checked on CPU: device discipline (strict CPU backend), SDPA attention, activation
recomputation, the fused-Adam step, and the runtime patches' install/uninstall.

One process (megatron-core imported once): the module fixture installs the runtime in strict mode,
starts a one-rank gloo group and undoes both afterwards. Strict mode tags every tensor with where it
would live on a GPU and raises where CUDA or NCCL would (see runtime/cpu_backend.py); the
multi-process tests run under it too (conftest sets MEGATRON_STAGED_STRICT_DEVICE=1).
"""
from __future__ import annotations

import os
import types

import pytest
import torch

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--vocab-size", "100", "--mock-data", "--progress-bar", "off"]
LLAMA_GQA = ["--model-family", "llama", "--group-query-attention", "--num-query-groups", "2", *TINY]
GPT2 = ["--model-family", "gpt2", *TINY]


@pytest.fixture(scope="module")
def strict_runtime():
    import torch.distributed as dist

    from megatron_staged import runtime
    from megatron_staged.runtime import cpu_backend

    if torch.cuda.is_available():
        pytest.skip("the strict CPU backend is for machines without CUDA")
    was_installed = cpu_backend.is_installed()
    saved_env = dict(os.environ)  # init_distributed sets MASTER_PORT etc. for its one-rank group
    runtime.uninstall()
    runtime.install(strict=True)
    from megatron_staged.runtime.distributed import init_distributed

    init_distributed()
    yield
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()
    runtime.uninstall()
    if was_installed:
        runtime.install()
    os.environ.clear()
    os.environ.update(saved_env)


def _cfg(argv):
    from megatron_staged.config import parse_config, validate
    from megatron_staged.model.builder import set_padded_vocab_size

    cfg = parse_config(list(argv))
    validate(cfg, 1)
    set_padded_vocab_size(cfg, 100)
    return cfg


def _batches(seed=0, n=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, 100, (2, seq + 1), generator=g)  # host memory, as from the data loader
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:]})
    return out


def _loss_and_grads(cfg, batches):
    """Build the model (same seed -> same weights), run forward+backward on ``batches``, return
    (mean loss, {param name: main_grad})."""
    from megatron_staged.builders import build_components
    from megatron_staged.training.trainer import run_microbatches

    comps = build_components(cfg)
    for chunk in comps.model:
        chunk.zero_grad_buffer()
    loss = run_microbatches(comps.model, iter(batches), len(batches), cfg, forward_only=False)
    grads = {n: p.main_grad.detach().clone() for n, p in comps.model[0].named_parameters()}
    return loss, grads, comps


# ---- strict mode itself -------------------------------------------------------------------------

def test_strict_mode_tags_placement_and_rejects_what_cuda_rejects(strict_runtime):
    import torch.distributed as dist

    from megatron_staged.runtime.cpu_backend import DeviceDisciplineError, on_device

    dev = torch.cuda.current_device()
    host = torch.zeros(3)
    on_dev = torch.zeros(3, device=dev)
    assert on_device(host) is False and on_device(on_dev) is True
    assert on_device(host + 1) is False and on_device(on_dev * 2) is True
    assert on_device(host.cuda()) is True and on_device(on_dev.cpu()) is False
    assert on_device(host.to("cuda")) is True and on_device(on_dev.to(torch.float64)) is True
    assert on_device(torch.empty(2, device=on_dev.device)) is True  # .device reports cuda for device tensors
    assert on_dev.is_cuda and not host.is_cuda and host.type() == "torch.FloatTensor"
    assert on_dev.type() == "torch.cuda.FloatTensor"
    # ops mixing device and host tensors fail (0-dim host scalars are allowed, as in CUDA)
    with pytest.raises(DeviceDisciplineError, match="host tensor"):
        on_dev + host
    assert on_device(on_dev + torch.tensor(2.0)) is True
    on_dev.copy_(host)  # cross-device copies are allowed
    # modules: parameters keep the tag of their data; .cuda() moves them
    lin = torch.nn.Linear(3, 3)
    assert on_device(lin.weight) is False
    with pytest.raises(DeviceDisciplineError):
        lin(on_dev)
    lin.cuda(dev)
    assert on_device(lin.weight) is True and on_device(lin(on_dev)) is True
    # collectives: host tensors fail (NCCL), device tensors pass, object collectives are torch's business
    with pytest.raises(DeviceDisciplineError, match="all_reduce on a host tensor"):
        dist.all_reduce(torch.zeros(2, dtype=torch.float64))
    t = torch.ones(2, device=dev)
    dist.all_reduce(t)
    assert t.tolist() == [1.0, 1.0]
    objs = [{"a": 1}]
    dist.broadcast_object_list(objs, src=0)
    assert objs == [{"a": 1}]
    # groups made with backend="gloo" (megatron's *_gloo groups) take host tensors on GPU machines too
    gloo = dist.new_group([0], backend="gloo")
    host2 = torch.ones(2)
    dist.all_reduce(host2, group=gloo)
    with pytest.raises(DeviceDisciplineError):
        dist.all_reduce(host2, group=dist.new_group([0]))


def test_average_loss_over_ranks_reduces_on_the_device(strict_runtime):
    """Found by reading: it all-reduced a host tensor (NCCL raises at iteration 1)."""
    from megatron_staged.builders import build_components
    from megatron_staged.training.trainer import average_loss_over_ranks

    build_components(_cfg(GPT2), with_optimizer=False)  # sets the parallel layout
    dev = torch.cuda.current_device()
    losses = [{"lm loss": torch.tensor(2.0, device=dev)}, {"lm loss": torch.tensor(4.0, device=dev)}]
    assert average_loss_over_ranks(losses) == pytest.approx(3.0)


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_model_lives_on_the_device_and_trains(strict_runtime, distributed_optimizer):
    """Found by reading: the model stayed in host memory unless the distributed optimizer's buffers
    moved it. Every parameter must be on the device whatever the optimizer, and a step must run."""
    from megatron_staged.runtime.cpu_backend import on_device

    argv = LLAMA_GQA + (["--use-distributed-optimizer"] if distributed_optimizer else [])
    cfg = _cfg(argv)
    loss, grads, comps = _loss_and_grads(cfg, _batches())
    for name, p in comps.model[0].named_parameters():
        assert on_device(p) is True, f"{name} is not on the device"
    ok, grad_norm, _ = comps.optimizer.step()
    assert ok and torch.isfinite(torch.tensor(loss)) and grad_norm > 0


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_16bit_training_keeps_fp32_main_params_on_the_device(strict_runtime, precision):
    from megatron_staged.runtime.cpu_backend import on_device

    loss, _, comps = _loss_and_grads(_cfg(GPT2 + [precision]), _batches())
    opt = (getattr(comps.optimizer, "chained_optimizers", None) or [comps.optimizer])[0]
    model_dtypes = {p.dtype for p in comps.model[0].parameters()}
    main = [p for g in opt.optimizer.param_groups for p in g["params"]]
    assert model_dtypes == {torch.bfloat16 if precision == "--bf16" else torch.float16}
    assert main and all(p.dtype == torch.float32 and on_device(p) is True for p in main)
    ok, _, _ = comps.optimizer.step()
    assert torch.isfinite(torch.tensor(loss)) and (ok or precision == "--fp16")  # fp16 may skip a step


def test_overlapped_grad_reduce_and_param_gather_train_the_same(strict_runtime):
    """megatron DDP's bucketed overlap (async collectives, param-gather hooks): same losses."""
    from megatron_staged.builders import build_components
    from megatron_staged.training.trainer import run_microbatches

    def losses(extra):
        cfg = _cfg(LLAMA_GQA + ["--use-distributed-optimizer"] + extra)
        comps = build_components(cfg)
        out = []
        for batch in _batches(seed=3, n=3):
            for chunk in comps.model:
                chunk.zero_grad_buffer()
            comps.optimizer.zero_grad()
            out.append(run_microbatches(comps.model, iter([batch]), 1, cfg, forward_only=False))
            comps.optimizer.step()
        return out

    ref = losses([])
    got = losses(["--overlap-grad-reduce", "--overlap-param-gather"])
    assert got == pytest.approx(ref, rel=1e-6) and got[-1] != got[0]


# ---- attention and recomputation ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_sdpa_attention_equals_megatron_local_attention(strict_runtime, family):
    """torch SDPA plugged in through the layer spec gives megatron DotProductAttention's loss and
    gradients (causal mask, GQA for llama, dropout 0)."""
    from megatron_staged.model.attention import SDPAttention

    argv = GPT2 if family == "gpt2" else LLAMA_GQA
    batches = _batches(seed=1)
    ref_loss, ref_grads, ref = _loss_and_grads(_cfg(argv + ["--attention-backend", "local"]), batches)
    loss, grads, comps = _loss_and_grads(_cfg(argv + ["--attention-backend", "sdpa"]), batches)
    kinds = {type(m).__name__ for m in comps.model[0].modules()}
    assert "SDPAttention" in kinds and "DotProductAttention" not in kinds
    assert "DotProductAttention" in {type(m).__name__ for m in ref.model[0].modules()}
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert SDPAttention  # imported: the spec's module is ours


def test_sdpa_attention_is_causal():
    """Changing a later token must not change earlier positions' outputs (and does change later ones)."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_staged.model.attention import SDPAttention

    cfg = types.SimpleNamespace(context_parallel_size=1, window_size=None, softmax_type="vanilla",
                                num_attention_heads=4, num_query_groups=2, kv_channels=8, attention_dropout=0.0,
                                sequence_parallel=False)
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=types.SimpleNamespace(
        tp=types.SimpleNamespace(size=lambda: 1)))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 2, 4, 8, generator=g), torch.randn(6, 2, 2, 8, generator=g), torch.randn(6, 2, 2, 8, generator=g)
    out = attn(q, k, v, None)
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 1.0
    v2[4:] += 1.0
    out2 = attn(q, k2, v2, None)
    assert out.shape == (6, 2, 32)
    torch.testing.assert_close(out[:4], out2[:4])
    assert not torch.allclose(out[4:], out2[4:])


@pytest.mark.parametrize("flags", [["--recompute-granularity", "full", "--recompute-method", "uniform",
                                    "--recompute-num-layers", "1"],
                                   ["--recompute-granularity", "full", "--recompute-method", "block",
                                    "--recompute-num-layers", "2"],
                                   ["--recompute-granularity", "selective"]],
                         ids=["full-uniform", "full-block", "selective"])
def test_recompute_gives_the_same_loss_and_grads(strict_runtime, flags):
    batches = _batches(seed=2)
    ref_loss, ref_grads, _ = _loss_and_grads(_cfg(LLAMA_GQA), batches)
    loss, grads, comps = _loss_and_grads(_cfg(LLAMA_GQA + flags), batches)
    assert comps.model[0].config.recompute_granularity == flags[1]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---- flags ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-method", "block", "--recompute-num-layers", "1"], "need --recompute-granularity full"),
    (["--fp16", "--initial-loss-scale", "0.5", "--min-loss-scale", "1"], "--initial-loss-scale"),
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
])
def test_bad_performance_flags_are_user_errors(argv, needle):
    from megatron_staged.config import parse_config, validate
    from megatron_staged.errors import UserError

    with pytest.raises(UserError, match=needle):
        validate(parse_config(GPT2 + argv), 1)


def test_sequence_parallel_without_transformer_engine_is_a_user_error(strict_runtime):
    from megatron_staged.errors import UserError
    from megatron_staged.model.builder import transformer_config

    cfg = _cfg(GPT2 + ["--sequence-parallel"])
    # TP 1: Megatron-LM turns sequence parallelism off (nothing to split): built without it, no error
    assert transformer_config(cfg).sequence_parallel is False
    cfg.parallel.tensor_model_parallel_size = 2  # where it would run: megatron's torch norms refuse it
    with pytest.raises(UserError, match="--sequence-parallel needs Transformer Engine"):
        transformer_config(cfg)


def test_a_growth_to_tp2_with_sequence_parallel_is_checked_at_start(strict_runtime):
    """--sequence-parallel at TP 1 is off until a width growth re-partitions to TP 2: that stage's
    model would need Transformer Engine, so the run stops before iteration 1, naming the stage."""
    from megatron_staged.errors import UserError
    from megatron_staged.staging.stages import StageRunner
    from megatron_staged.training.state import TrainState

    cfg = _cfg(GPT2 + ["--sequence-parallel", "--train-iters", "10", "--global-batch-size", "4"])
    cfg.staging.stages = [{"at_iteration": 5, "width_factor": 2, "target_tensor_model_parallel_size": 2}]
    with pytest.raises(UserError, match=r"^staging.stages\[0\] grows to TP2: --sequence-parallel needs "
                                        r"Transformer Engine"):
        StageRunner(cfg, 2, TrainState())
    cfg.staging.stages = [{"at_iteration": 5, "width_factor": 2}]  # stays at TP 1: nothing to check
    assert len(StageRunner(cfg, 2, TrainState()).pending) == 1


def test_fp16_loss_scaling_flags_reach_megatron(strict_runtime):
    from megatron_staged.builders import build_components

    cfg = _cfg(GPT2 + ["--fp16", "--initial-loss-scale", "4096", "--min-loss-scale", "2",
                       "--loss-scale-window", "7", "--hysteresis", "3"])
    def scaler_of(opt):
        return (getattr(opt, "chained_optimizers", None) or [opt])[0].grad_scaler

    scaler = scaler_of(build_components(cfg).optimizer)
    assert float(scaler.scale) == 4096 and float(scaler.min_scale) == 2
    assert scaler.growth_interval == 7 and scaler.hysteresis == 3
    const = scaler_of(build_components(_cfg(GPT2 + ["--fp16", "--loss-scale", "128"])).optimizer)
    assert type(const).__name__ == "ConstantGradScaler" and float(const.scale) == 128


def test_feature_line_names_every_choice(strict_runtime):
    from megatron_staged.runtime import features

    cfg = _cfg(GPT2 + ["--bf16", "--recompute-granularity", "selective", "--overlap-grad-reduce"])
    line = features.describe(cfg, features.detect(), "gloo")
    for needle in ("device cpu", "backend gloo", "bf16 (fp32 main params)", "layer spec local", "attention local",
                   "norms torch", "optimizer torch.AdamW", "sequence parallel off", "overlap grad reduce on",
                   "overlap param gather off", "recompute selective"):
        assert needle in line, (needle, line)


# ---- optimizer step across a rebuild (growth, checkpoint load) -------------------------------------

class GroupStepAdam(torch.optim.Optimizer):
    """Adam keeping its bias-correction step per param group, as TE's and apex's FusedAdam do."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
            (b1, b2), t = g["betas"], g["step"]
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(g["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / (1 - b1 ** t))


@pytest.mark.parametrize("cls", [GroupStepAdam, torch.optim.AdamW], ids=["step-per-group", "torch-adamw"])
def test_adam_step_survives_a_rebuild(cls):
    """Rebuilding the optimizer (growth, checkpoint load) with the moments copied and the step
    carried by get/set_optimizer_step continues exactly like the original optimizer."""
    from megatron_staged.checkpoint.manager import get_optimizer_step, set_optimizer_step

    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, generator=g))
    opt = cls([w])
    for _ in range(3):
        w.grad = torch.randn(5, generator=g)
        opt.step()
    wrapped = types.SimpleNamespace(optimizer=opt)  # megatron's optimizers wrap the torch one
    step = get_optimizer_step(wrapped)
    assert step == 3
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = cls([w2])
    opt2.state[w2] = {k: v.clone() for k, v in opt.state[w].items() if k in ("exp_avg", "exp_avg_sq")}
    set_optimizer_step(types.SimpleNamespace(optimizer=opt2), step)
    assert get_optimizer_step(types.SimpleNamespace(optimizer=opt2)) == 3
    grad = torch.randn(5, generator=g)
    w.grad, w2.grad = grad, grad.clone()
    opt.step()
    opt2.step()
    torch.testing.assert_close(w2, w, rtol=0, atol=0)


# ---- the runtime patches --------------------------------------------------------------------------

def test_runtime_install_is_undone_by_uninstall():
    import torch.distributed as dist

    from megatron_staged import runtime
    from megatron_staged.runtime import cpu_backend, megatron_fixes

    if torch.cuda.is_available():
        pytest.skip("the CPU backend installs only without CUDA")
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    was = cpu_backend.is_installed(), cpu_backend.is_strict()
    runtime.uninstall()
    try:
        originals = (torch.cuda.current_device, dist.all_reduce, torch.nn.Parameter.__new__,
                     DistributedOptimizer.get_parameter_state_dp_zero)
        with runtime.installed(strict=True) as lines:
            assert any("get_parameter_state_dp_zero" in l for l in lines)
            assert any(l.startswith("CPU backend: strict") for l in lines)
            assert torch.cuda.current_device() == 0 and dist.all_reduce is not originals[1]
            assert DistributedOptimizer.get_parameter_state_dp_zero is not originals[3]
            assert torch.zeros(1, device="cuda").device.type == "cuda"  # tagged: reports the device
            assert runtime.summary() == ("runtime patches: megatron-core 0.16.1 fixes: "
                                         "DistributedOptimizer.get_parameter_state_dp_zero; "
                                         "filesystem_async._get_write_results_queue | "
                                         "CPU backend for megatron-core (strict device checks)")
        assert (torch.cuda.current_device, dist.all_reduce, torch.nn.Parameter.__new__,
                DistributedOptimizer.get_parameter_state_dp_zero) == originals
        assert not cpu_backend.is_installed() and not megatron_fixes.is_installed()
        with pytest.raises(Exception):  # no CUDA, no shim: torch's own error again
            torch.zeros(1, device="cuda")
        assert not torch._C._is_torch_function_mode_enabled()
    finally:
        if was[0]:
            runtime.install(strict=was[1])


def test_megatron_fixes_check_the_version(monkeypatch):
    from megatron_staged.errors import UserError
    from megatron_staged.runtime import megatron_fixes

    was = megatron_fixes.is_installed()
    megatron_fixes.uninstall()
    try:
        monkeypatch.setattr(megatron_fixes, "megatron_core_version", lambda: "99.0.0")
        with pytest.warns(UserWarning, match="99.0.0 is not a version"):
            lines = megatron_fixes.install()
        assert lines and "bucket-end padding" in lines[0]
        megatron_fixes.uninstall()
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        monkeypatch.delattr(DistributedOptimizer, "get_parameter_state_dp_zero")
        with pytest.raises(UserError, match="megatron-core 99.0.0 is not supported"):
            megatron_fixes.install()
    finally:
        monkeypatch.undo()
        megatron_fixes.uninstall()
        if was:
            megatron_fixes.install()


# ---- examples/gpu_smoke.sh ---------------------------------------------------------------------------

def test_peak_throughput_and_mfu_arithmetic():
    from megatron_staged.runtime import perf

    assert perf.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4  # SXM
    assert perf.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert perf.peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert perf.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert perf.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None
    assert perf.peak_tflops("cpu", "bf16") is None
    # 1e15 model FLOPs per iteration; iterations 1..5 of 2 s each except the 4 s warm-up iteration 1;
    # skip 1 -> 4 iterations in 8 s on 2 GPUs = 1e15 * 4 / 8 / 2 = 250 TFLOP/s per GPU
    records = [{"iteration": 1, "elapsed_ms": 4000.0}] + [{"iteration": i, "elapsed_ms": 2000.0} for i in range(2, 6)]
    records += [{"iteration": 3, "eval_loss": 1.0}, {"iteration": 6, "elapsed_ms": 1.0}]  # ignored
    ph = perf.phase_from_records(records, 1, 5, 1e15, world_size=2, skip=1)
    assert ph.iterations == 4 and ph.ms_per_iteration == 2000.0
    assert ph.tflops_per_gpu == pytest.approx(250.0)
    assert ph.mfu(1000.0) == pytest.approx(0.25) and ph.mfu(None) is None
    assert perf.eval_loss_verdict(10.0, 10.05, "bf16").startswith("OK")
    assert perf.eval_loss_verdict(10.0, 10.2, "bf16").startswith("FAIL")
    assert perf.eval_loss_verdict(10.0, 10.001, "fp32").startswith("FAIL")


def test_gpu_smoke_script_runs_at_toy_size(tmp_path):
    """examples/gpu_smoke.sh --toy: the whole script (phases, in-run growth, report) on CPU."""
    import json
    import os
    import subprocess

    from conftest import ROOT, _env

    out = tmp_path / "smoke.json"
    env = {k: v for k, v in _env().items()  # not the in-process group's rendezvous (see strict_runtime)
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(["bash", str(ROOT / "examples" / "gpu_smoke.sh"), "--toy", "--json", str(out)],
                       cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("gpu_smoke ")]
    assert [l.split(":")[0] for l in lines] == ["gpu_smoke device", "gpu_smoke before growth", "gpu_smoke growth",
                                               "gpu_smoke after growth"], r.stdout[-3000:]
    res = json.loads(out.read_text())
    assert res["before"]["layers"] == 2 and res["after"]["layers"] == 4
    assert res["after"]["parameters"] > res["before"]["parameters"]
    assert res["before"]["tflops_per_gpu"] > 0 and res["after"]["tflops_per_gpu"] > 0
    g = res["growth"]
    assert g["eval_loss_after"] == pytest.approx(g["eval_loss_before"], rel=1e-5) and g["verdict"].startswith("OK")
    assert g["seconds"] > 0
    assert "features: " in r.stdout and os.path.isfile(out)


def test_fp16_overflow_is_skipped_by_the_loss_scaler_not_stopped(tmp_path):
    """Found as a new user: `train --fp16` stopped at iteration 1 with "non-finite gradients": the
    non-finite guard checked the *scaled* fp16 gradients, which overflow by design at the initial
    loss scale 2**32. As in Megatron-LM, the dynamic loss scaler must skip such steps and lower
    the scale, and the run goes on."""
    import re

    import sys

    from conftest import _env, _run

    env = {k: v for k, v in _env().items()  # not the in-process group's rendezvous (see strict_runtime)
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = _run([sys.executable, "-m", "megatron_staged", "train", *GPT2, "--fp16", "--global-batch-size", "2",
              "--train-iters", "4", "--log-interval", "1", "--eval-iters", "1"], 300, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if " iteration " in l and "loss scale:" in l]
    assert len(lines) == 4, r.stdout[-2000:]
    scales = [float(re.search(r"loss scale: ([0-9.e+]+)", l).group(1)) for l in lines]
    skipped = [int(re.search(r"number of skipped iterations:\s+(\d+)", l).group(1)) for l in lines]
    assert skipped[0] == 1 and sum(skipped) >= 2  # overflowed steps are counted as skipped
    assert scales[-1] < 2.0 ** 32 and scales == sorted(scales, reverse=True)  # and the scale came down
