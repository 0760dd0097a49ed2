"""Drive a :class:`Sparsifier` by a schedule, one optimizer step at a time.

An instance is called with the step number before each optimizer step (a training loop's step
hook): it sets the step's omission rates and returns what the step's record should say.
"""

from __future__ import annotations

from typing import Any, Optional

from satrun.sat.schedule import Stage, stage_at
from satrun.sat.sparsifier import Sparsifier


class ScheduledSparsity:
    def __init__(self, stages: list[Stage], sparsifier: Optional[Sparsifier]) -> None:
        self.stages, self.sparsifier = stages, sparsifier
        if sparsifier is not None:
            for stage in stages:  # a per-layer vector must fit the model: fail before training
                stage.per_layer(sparsifier.num_layers)
        self._stage: Optional[str] = None
        self.current: Stage = stages[0]  # the stage of the step being trained
        self._charged = 0.0
        self.select_s_by_stage: dict[str, float] = {}

    def __call__(self, step: int) -> dict[str, Any]:
        self._charge()
        stage = stage_at(self.stages, step)
        if self.sparsifier is not None:
            self.sparsifier.set_rates(stage.mlp_rates, stage.attn_rate, step)
        self._stage, self.current = stage.name, stage
        return {"stage": stage.name, "mlp_rate": stage.mlp_rate, "attn_rate": stage.attn_rate}

    def _charge(self) -> None:
        """Attribute scoring and selection time since the last call to the stage that spent it."""
        if self.sparsifier is None or self._stage is None:
            return
        spent = self.sparsifier.select_s - self._charged
        self._charged = self.sparsifier.select_s
        self.select_s_by_stage[self._stage] = self.select_s_by_stage.get(self._stage, 0.0) + spent

    def overhead_by_stage(self) -> dict[str, float]:
        """Seconds spent in importance + selection per stage (call after training)."""
        self._charge()
        return dict(self.select_s_by_stage)
