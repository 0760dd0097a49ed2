"""Sparsity-Accelerated Training (SAT) as a library.

Score heads and MLP channels (``importance``), choose the kept ones (``selection``), compute only
them in forward and backward (``sparse_ops``, applied to a model by ``Sparsifier``), and lower
the omission rate over training (``schedule``; ``ScheduledSparsity`` drives a Sparsifier from a
training loop). Nothing here knows about Hydra or satrun's trainer.
"""

from satrun.sat.schedule import ScheduleError, Stage, build_stages, stage_at
from satrun.sat.scheduled import ScheduledSparsity
from satrun.sat.settings import MetricConfig, SchedulerConfig, SelectorConfig
from satrun.sat.layers import UnsupportedModel
from satrun.sat.sparsifier import Sparsifier

__all__ = [
    "MetricConfig", "SchedulerConfig", "SelectorConfig", "ScheduleError", "ScheduledSparsity", "Sparsifier",
    "Stage", "UnsupportedModel", "build_stages", "stage_at",
]
