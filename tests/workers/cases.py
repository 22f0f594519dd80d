"""The loop the multi-case workers share: many cases inside one torchrun job (megatron-core imported once).

    run_cases(run_case)   # argv: CASES.json RESULTS.jsonl

Each case (a dict with a "name") is run by ``run_case(case) -> dict`` on every rank, under the CLI's
own runtime (megatron-core fixes, CPU backend) and data-only checkpoint reads; rank 0 writes one JSON
line per case, flushed as it finishes.
"""
import json
import os
import sys


def run_cases(run_case) -> None:
    import torch.distributed as dist

    from megatron_staged import runtime
    from megatron_staged.checkpoint.safe_load import untrusted_checkpoint_reads

    cases = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "w") if os.environ.get("RANK", "0") == "0" else open(os.devnull, "w") as out:
        with untrusted_checkpoint_reads(), runtime.installed():
            for c in cases:
                out.write(json.dumps(dict(run_case(c), name=c["name"])) + "\n")
                out.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
