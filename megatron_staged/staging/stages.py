"""Growth stages inside a running job (filled in by the growth engine)."""
from __future__ import annotations


class StageRunner:
    """Applies the configured growth stages when their iteration is reached."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.pending = sorted(trainer.cfg.staging.stages or [], key=lambda s: s.get("at_iteration", 0))

    def maybe_grow(self) -> None:
        if not self.pending:
            return
        from megatron_staged.errors import UserError

        raise UserError("growth stages are not available in this build")
