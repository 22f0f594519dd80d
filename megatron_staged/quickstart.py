"""``megatron-staged quickstart``: a small staged run on CPU (or GPU), no data needed.

Builds the built-in corpus (the Python standard library's sources -> sentencepiece -> .bin/.idx,
cached), then trains a 2-layer GPT-2-style model at TP2 x PP2 on 4 processes, grows it inside the
run — depth x2 (2 -> 4 layers) at iteration 100, width x2 (hidden 128 -> 256, 4 -> 8 heads) at
iteration 200 — and trains on to iteration 300, printing the eval loss just before and just after
each growth. Extra flags are passed to ``train`` (e.g. ``--train-iters 600``, ``--save DIR``).
It ends by writing ``quickstart_output/report.png`` (validation loss against FLOPs and wall time,
growths marked) from the run's metric log, ``quickstart_output/metrics.jsonl``.

Run outside torchrun, it relaunches itself with ``torch.distributed.run --nproc-per-node 4``.
"""
from __future__ import annotations

import os
import subprocess
import sys

NPROC = 4
OUTPUT_DIR = "quickstart_output"

QUICKSTART_YAML = """\
# A staged run: small model -> depth x2 -> width x2, on the built-in corpus.
model:
  model_family: gpt2
  num_layers: 2
  hidden_size: 128
  num_attention_heads: 4
  seq_length: 128
parallel:
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 2
  use_distributed_optimizer: true
training:
  micro_batch_size: 4
  global_batch_size: 16
  train_iters: 300
  eval_interval: 50
  eval_iters: 4
  log_interval: 20
optim:
  lr: 2.0e-3
  min_lr: 2.0e-4
  lr_warmup_iters: 20
  lr_decay_style: cosine
  # the growths set the schedule back to S_pre / rho: 100 -> round(100/1.4) = 71, then 171 -> round(171/1.8) = 95,
  # so at iteration 300 the schedule is at step 195: end the cosine there (plan/--dry-run say so when it does not)
  lr_decay_iters: 195
  weight_decay: 0.01
  clip_grad: 1.0
data:
  builtin_corpus: true  # Megatron-LM needs --data-path or --mock-data; the quickstart asks for the corpus by name
logging:
  log_throughput: true
staging:
  stages:
    - {at_iteration: 100, depth_factor: 2, depth_placement: interleave, depth_init: identity, rewarmup_iters: 10}
    - {at_iteration: 200, width_factor: 2, rewarmup_iters: 10}
"""


def main(argv) -> int:
    if "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC),
               "-m", "megatron_staged", "quickstart", *argv]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("PYTHONWARNINGS", "ignore")
        os.makedirs(OUTPUT_DIR, exist_ok=True)
        log = os.path.join(OUTPUT_DIR, "metrics.jsonl")
        if os.path.exists(log):
            os.remove(log)  # one run per log: report reads it whole
        print("launching: " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc == 0:
            from megatron_staged.tools.report import main as report

            report([log, "--out", os.path.join(OUTPUT_DIR, "report.png")])
        return rc

    from megatron_staged.cli import _train_parser
    from megatron_staged.config import config_from_args
    from megatron_staged.runtime.distributed import print_rank0
    from megatron_staged.training.trainer import Trainer

    import yaml

    from megatron_staged.config import Config, apply_mapping

    base = Config()
    apply_mapping(base, yaml.safe_load(QUICKSTART_YAML), source="quickstart")
    base.logging.log_file = os.path.join(OUTPUT_DIR, "metrics.jsonl")
    cfg = config_from_args(_train_parser("megatron-staged quickstart").parse_args(argv), base=base)
    summary = Trainer(cfg).train()
    print_rank0("\nquickstart finished: iteration {iteration}, final training loss {loss:.4f}, "
                "{flops_so_far:.3e} FLOPs".format(**summary))
    for e in summary["stage_history"]:
        print_rank0(f"  growth at iteration {e['iteration']}: {e['operator']:>12} "
                    f"{e['from']['num_layers']}x{e['from']['hidden_size']} -> {e['to']['num_layers']}x{e['to']['hidden_size']} | "
                    f"eval loss before {e.get('eval_loss_before', float('nan')):.6f} "
                    f"after {e.get('eval_loss_after', float('nan')):.6f}")
    return 0
