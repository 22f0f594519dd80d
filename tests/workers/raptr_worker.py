"""RaPTr / layer-drop scenarios inside one torchrun job (process groups are rebuilt per scenario).

    torchrun --nproc-per-node 4 tests/workers/raptr_worker.py CASES.json RESULTS.json

CASES.json: {"data": [...flags...], "base": [...flags...], "out_dir": DIR, "cases": [ {name, kind, ...} ]}
Kinds:
  train    train with the given flags; per rank, record the drop masks the controller drew and which
           layers actually ran (forward hooks on each layer's attention, independent of the
           controller), per (iteration, local micro-batch); and whether the optimizer left the
           parameters of layers without gradient unchanged.
  removed  one forward/backward with given layers dropped (a forced mask) against a model built with
           those layers left out and holding the same weights: losses and gradients.
  resume   the same run straight, and split in two by a checkpoint (load in a new Trainer).
Every rank writes its records; rank 0 gathers them into RESULTS.json.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")


def _trainer(args):
    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.training.trainer import Trainer

    cfg = config_from_args(_train_parser("worker").parse_args(args))
    return Trainer(cfg)


def _layers(trainer):
    from megatron_staged.model.builder import unwrap

    return [layer for chunk in trainer.model for layer in unwrap(chunk).decoder.layers]


def _ranks():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {"rank": dist.get_rank(), "tp": ps.get_tensor_model_parallel_rank(),
            "pp": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
            "dp_size": ps.get_data_parallel_world_size()}


def run_train(case, data, base, out_dir):
    """Train, recording masks, executed layers and the optimizer's treatment of dropped layers."""
    import torch

    log = os.path.join(out_dir, case["name"] + ".jsonl")
    tr = _trainer([*base, *data, *case["args"], "--log-file", log])
    ld = tr.components.layer_drop
    executed = []  # (iteration, local micro-batch, layer number) that really ran on this rank
    for layer in _layers(tr):
        def hook(mod, args, out, n=layer.layer_number):
            if mod.training:
                executed.append((tr.state.iteration, ld.micro_batch if ld else -1, n))
        layer.self_attention.register_forward_hook(hook)

    masks, checks = {}, {"unchanged_dropped": 0, "moved_dropped": 0, "changed_kept": 0, "unchanged_kept": 0}
    updated_before = set()
    step = tr.train_step

    def recording_step():
        before = {l.layer_number: [p.detach().clone() for p in l.parameters()] for l in _layers(tr)}
        out = step()
        if ld is not None:
            masks[ld.iteration] = [m.int().tolist() for m in ld.masks]  # 0-based step index
            for l in _layers(tr):
                same = all(torch.equal(a, b) for a, b in zip(before[l.layer_number], l.parameters()))
                if l.layer_number in ld.no_grad_layers:
                    if l.layer_number in updated_before:  # Adam has momentum for it: it would move
                        checks["unchanged_dropped" if same else "moved_dropped"] += 1
                else:
                    checks["changed_kept" if not same else "unchanged_kept"] += 1
                    updated_before.add(l.layer_number)
        return out

    tr.train_step = recording_step
    tr.train()
    return {"masks": masks, "executed": executed, "checks": checks,
            "layers": sorted(l.layer_number for l in _layers(tr)), "log": log}


def _fwd_bwd(tr):
    """One forward/backward through the trainer's schedule; (loss, {param name: main_grad})."""
    from megatron_staged.model.builder import unwrap
    from megatron_staged.training.trainer import run_microbatches

    for chunk in tr.model:
        chunk.zero_grad_buffer()
    ld = tr.components.layer_drop
    if ld is not None:
        ld.begin_step(tr.state.iteration, tr.num_microbatches)
    loss = run_microbatches(tr.model, tr.train_iter, tr.num_microbatches, tr.cfg, forward_only=False)
    if ld is not None:
        ld.end_step()
    grads = {n: p.main_grad.detach().clone() for n, p in unwrap(tr.model[0]).named_parameters()}
    return loss, grads


def run_removed(case, data, base, out_dir):
    """Layers `drop` (1-based) dropped == a model without them, same weights (PP1, any TP/DP)."""
    import torch

    from megatron_staged.model.builder import unwrap

    full = _trainer([*base, *data, *case["args"], "--raptr-keep-probs", "0.5", "--raptr-fixed-layers", "none"])
    L = full.cfg.model.num_layers
    drop = set(case["drop"])
    keep = [l for l in range(1, L + 1) if l not in drop]
    full.components.layer_drop.forced = torch.tensor([l not in drop for l in range(1, L + 1)])
    full_sd = {n: p.detach().clone() for n, p in unwrap(full.model[0]).named_parameters()}
    loss_full, g_full = _fwd_bwd(full)
    del full

    ref = _trainer([*base, *data, *case["args"], "--num-layers", str(len(keep))])
    rename = {f"decoder.layers.{l - 1}.": f"decoder.layers.{j}." for j, l in enumerate(keep)}

    def to_ref(name):
        for a, b in rename.items():
            if name.startswith(a):
                return b + name[len(a):]
        return None if name.startswith("decoder.layers.") else name

    ref_params = dict(unwrap(ref.model[0]).named_parameters())
    with torch.no_grad():
        for n, t in full_sd.items():
            if to_ref(n) is not None:
                ref_params[to_ref(n)].copy_(t)
    loss_ref, g_ref = _fwd_bwd(ref)
    grad_diff, dropped_grad_max, compared = 0.0, 0.0, 0
    for n, g in g_full.items():
        r = to_ref(n)
        if r is None:
            dropped_grad_max = max(dropped_grad_max, float(g.abs().max()))
        else:
            grad_diff = max(grad_diff, float((g - g_ref[r]).abs().max() / (g_ref[r].abs().max() + 1e-12)))
            compared += 1
    return {"loss_full": loss_full, "loss_ref": loss_ref, "grad_rel_diff": grad_diff,
            "dropped_grad_max": dropped_grad_max, "compared": compared}


def _losses(path):
    return {r["iteration"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


def run_resume(case, data, base, out_dir):
    """N iterations straight == N/2, save, a new Trainer loading it, N/2 more."""
    n = case["iters"]
    ck = os.path.join(out_dir, case["name"] + "_ckpt")
    logs = [os.path.join(out_dir, f"{case['name']}_{k}.jsonl") for k in ("straight", "first", "second")]
    args = [*base, *data, *case["args"], "--train-iters", str(n)]
    _trainer([*args, "--log-file", logs[0]]).train()
    _trainer([*args, "--log-file", logs[1], "--exit-interval", str(n // 2), "--save", ck]).train()
    _trainer([*args, "--log-file", logs[2], "--load", ck]).train()
    recs = [[json.loads(l) for l in open(p)] for p in logs]
    return {"straight": _losses(logs[0]), "first": _losses(logs[1]), "second": _losses(logs[2]),
            "active_straight": {r["iteration"]: r["active_layers"] for r in recs[0] if "active_layers" in r},
            "active_resumed": {r["iteration"]: r["active_layers"] for r in recs[1] + recs[2] if "active_layers" in r}}


def main():
    import torch.distributed as dist

    spec = json.load(open(sys.argv[1]))
    runners = {"train": run_train, "removed": run_removed, "resume": run_resume}
    results = {}
    for case in spec["cases"]:
        out = runners[case["kind"]](case, spec["data"], spec["base"], spec["out_dir"])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(out, **_ranks()))
        results[case["name"]] = gathered
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
