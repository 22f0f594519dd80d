"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import os


def replace_section(path: str, heading: str, body: str) -> None:
    """Replace (or append) the '## heading' section of a markdown file, keeping the others intact."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == f"## {heading}"), None)
    new = [f"## {heading}", ""] + body.rstrip("\n").splitlines() + [""]
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines = lines + [""] + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + new + lines[end:]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines).rstrip("\n") + "\n")
    os.replace(tmp, path)


def machine_info(world: int) -> dict:
    """The machine and software a figure was measured on."""
    import datetime
    import platform

    import megatron.core
    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    total_mem = None
    try:
        import psutil

        total_mem = psutil.virtual_memory().total
    except Exception:
        pass
    return {"ranks": world, "cpu_model": cpu, "cpu_cores_usable": usable, "cpu_count": os.cpu_count(),
            "mem_total": total_mem, "torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
