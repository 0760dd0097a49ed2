"""``satrun eval``: lm-evaluation-harness benchmarks of a run's model or any configured model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import set_seed

from satrun.config import TrainConfig
from satrun.errors import UsageError
from satrun.inference import inference_model
from satrun.training import distributed, runtime


def run(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Benchmarks of a trained (or any configured) model through lm-evaluation-harness: the
    harness's results in eval.json, its table on the terminal and in eval.md."""
    from lm_eval.utils import handle_non_serializable

    from satrun import evaluation

    e = cfg.eval
    if distributed.current().size > 1:
        raise UsageError("satrun eval runs in one process (every rank would score the whole task); run it without torchrun")
    manager = evaluation.task_manager(e)  # an unknown task fails before any weights load
    set_seed(cfg.trainer.seed)
    device = runtime.resolve_device(cfg.trainer.device)
    folder, tokenizer, model = inference_model(cfg, e.run, "eval.run")
    model.to(device)
    amp = runtime.precision_context(cfg.trainer.precision, device)
    results = evaluation.evaluate(model, tokenizer, e, cfg.trainer.seed, amp, manager)
    results["satrun"] = {"model": str(folder or cfg.model.name), "scores": evaluation.scores(results)}
    text = evaluation.table(results)
    staging = run_dir / "eval.json.tmp"  # complete or absent
    staging.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    staging.replace(run_dir / "eval.json")
    (run_dir / "eval.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"results written to {run_dir / 'eval.json'} (model: {folder or cfg.model.name})")
    return results
