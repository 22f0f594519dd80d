"""The process-wide runtime an entry point sets up before building anything.

:func:`install` applies the megatron-core fixes (:mod:`.megatron_fixes`, version-checked) and, when
CUDA is unavailable, the CPU backend (:mod:`.cpu_backend`, strict device checks when
``MEGATRON_STAGED_STRICT_DEVICE=1``). Entry points own it: ``megatron_staged.cli.main`` runs each
command inside :func:`owned` (what the command installed is undone afterwards); the runtime is
installed where megatron-core is first needed, by ``init_distributed`` (every command that builds a
model calls it) and ``Trainer``. Tests undo it with :func:`uninstall`.
"""
from __future__ import annotations

import contextlib


def install(strict: bool | None = None) -> list[str]:
    """Install (idempotent); returns what is patched and why, one line per patch."""
    from megatron_staged.runtime import cpu_backend, megatron_fixes

    from megatron_staged.checkpoint import safe_load

    lines = [f"megatron-core fix: {f}" for f in megatron_fixes.install()]
    safe_load.megatron_loaded()  # megatron-core's checkpoint loaders may now read its enums
    if cpu_backend.install(strict):
        lines += [f"CPU backend: {p}" for p in cpu_backend.describe()]
    return lines


def summary() -> str:
    """One line for the start of a run: which patches are in place (install() returns the reasons)."""
    from megatron_staged.runtime import cpu_backend, megatron_fixes

    parts = []
    if megatron_fixes.is_installed():
        parts.append(f"megatron-core {megatron_fixes.megatron_core_version()} fixes: "
                     + "; ".join(f.split(":")[0] for f in megatron_fixes.FIXES))
    if cpu_backend.is_installed():
        parts.append("CPU backend for megatron-core" + (" (strict device checks)" if cpu_backend.is_strict() else ""))
    return "runtime patches: " + (" | ".join(parts) or "none")


def uninstall() -> None:
    from megatron_staged.runtime import cpu_backend, megatron_fixes

    cpu_backend.uninstall()
    megatron_fixes.uninstall()


@contextlib.contextmanager
def owned():
    """Undo afterwards whatever the block installs, when it needs it (``init_distributed`` installs
    the runtime), so a command that fails its checks first never imports megatron-core."""
    from megatron_staged.runtime import cpu_backend, megatron_fixes

    had = (cpu_backend.is_installed(), megatron_fixes.is_installed())
    try:
        yield
    finally:
        if not had[0]:
            cpu_backend.uninstall()
        if not had[1]:
            megatron_fixes.uninstall()


@contextlib.contextmanager
def installed(strict: bool | None = None):
    """Install for the block; undo afterwards what this block installed."""
    with owned():
        yield install(strict)
