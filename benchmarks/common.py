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
