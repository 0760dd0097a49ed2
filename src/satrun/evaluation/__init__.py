"""Benchmarks of a model in memory through EleutherAI's lm-evaluation-harness: what `satrun eval`
runs and what a training run with ``trainer.benchmark_every`` records.

The harness does the work (task configs, prompts, loglikelihood scoring, metrics); satrun hands
it the model it already holds (the harness's HFLM wrapper takes a model object), finds tasks in
its own folder (``tasks/``: offline tasks built from the packaged corpora), in the user's
``eval.include_path`` folders and among the harness's own tasks, and flattens the results into
``task/metric`` scores for records, summaries and reports.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import torch

from satrun.config import EvalConfig
from satrun.errors import UsageError

TASKS = Path(__file__).resolve().parent / "tasks"  # satrun's own tasks (offline)
# The harness's loggers report each step of task loading and the model wrapper's caveats.
_HARNESS_LOGGERS = ("lm-eval", "lm_eval")
_COUNTS = ("sample_len", "samples")  # sizes, not scores, among a task's results


def task_manager(e: EvalConfig) -> Any:
    """A harness TaskManager that knows every name in ``eval.tasks``. Indexing the harness's
    own thousands of task files takes seconds, so they are left out when satrun's and the
    user's folders hold all the names asked for. An unknown name is one line."""
    from lm_eval.tasks import TaskManager

    folders = [str(TASKS)]
    for folder in e.include_path:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UsageError(f"eval.include_path: {folder} is not a folder")
        _check_task_files(path)
        folders.append(str(path))
    local = TaskManager(include_path=folders, include_defaults=False)
    if all(name in local.all_tasks for name in e.tasks):
        return local
    manager = TaskManager(include_path=folders)
    unknown = [name for name in e.tasks if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise UsageError(f"eval.tasks: no task {unknown[0]!r} in the harness or eval.include_path{hint} "
                         f"(satrun's own: {', '.join(local_tasks())})")
    return manager


def _check_task_files(folder: Path) -> None:
    """The harness skips a task file it cannot parse without a word (and then reports its task
    unknown): name the file and line instead. Tags such as ``!function`` are the harness's own."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for path in sorted(folder.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
        except UnicodeDecodeError as exc:
            raise UsageError(f"eval.include_path: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except yaml.MarkedYAMLError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
            raise UsageError(f"eval.include_path: {path}:{line}: not valid YAML: {exc.problem}") from exc


def local_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS.glob("*.yaml"))


def evaluate(model: torch.nn.Module, tokenizer: Any, e: EvalConfig, seed: int, amp: Any = None,
             manager: Any = None, progress: bool = True, stderr: bool = True) -> dict[str, Any]:
    """The harness's results (its own structure: ``results``, ``configs``, ``versions``,
    ``n-shot``, ...) for ``model`` in eval mode (SAT's sparse steps are training-mode only, so
    the dense model is scored), its training mode restored after. ``stderr``: the harness's
    standard errors too (analytic for means, bootstrapped for other aggregates)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(e)
    was_training = model.training
    model.eval()
    try:
        with _quiet_harness(progress), _random_state_kept(model), torch.no_grad(), (amp or contextlib.nullcontext()):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e.batch_size)
            results = simple_evaluate(
                model=lm, tasks=list(e.tasks), num_fewshot=e.num_fewshot, limit=e.limit, task_manager=manager,
                log_samples=False, apply_chat_template=e.chat_template, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed, **({} if stderr else {"bootstrap_iters": 0}),
            )
    finally:
        model.train(was_training)
    if results is None:  # only ranks other than the harness's first return None; satrun gives it one
        raise RuntimeError("the harness returned no results")
    return results


def scores(results: dict[str, Any]) -> dict[str, float]:
    """``task/metric`` -> value for every task and group in ``results`` (the harness's
    ``acc,none`` keys without their filter suffix where it is the default ``none``; standard
    errors and example counts left out)."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key or key in _COUNTS:
                continue
            metric, _, filtered = key.partition(",")
            name = metric if filtered in ("", "none") else f"{metric}[{filtered}]"
            flat[f"{task}/{name}"] = float(value)
    return flat


def table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)


@contextlib.contextmanager
def _random_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """The harness seeds Python's, NumPy's and torch's generators: put them back afterwards, so
    a training run it interrupts goes on exactly as without it."""
    import random

    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _git_hash() -> str | None:
    """The commit of the working folder, as the harness records it (``git_hash``), or None
    outside a repository, without git's complaint on stderr."""
    try:
        found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return found.stdout.strip() or None


@contextlib.contextmanager
def _quiet_harness(progress: bool) -> Iterator[None]:
    """The harness's info logging off (its warnings stay), and its progress bars too unless asked."""
    import lm_eval.evaluator

    loggers = [logging.getLogger(name) for name in _HARNESS_LOGGERS]
    levels = [lg.level for lg in loggers]
    previous = os.environ.get("TQDM_DISABLE")
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"
    git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_hash  # the harness's own asks git and lets it print to stderr
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
