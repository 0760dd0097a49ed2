"""``satrun <command> [hydra overrides]``.

Hydra composes the config; errors are mapped to exit codes here: bad input (unknown key or
option, missing model or data, ...) prints one line and exits 2; a bug keeps its traceback.
``SATRUN_DEBUG=1`` shows the traceback of bad input too.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from satrun.cli.configs import GROUPS, config_dir, group_options

USAGE_EXIT = 2


def _task(name: str) -> Callable:
    """A Hydra task running recipe ``name``: DictConfig in, typed config down; nothing below sees Hydra."""

    def task(cfg):  # type: ignore[no-untyped-def]
        from hydra.core.hydra_config import HydraConfig

        from satrun import recipe
        from satrun.config import from_dict

        return getattr(recipe, name)(from_dict(cfg), Path(HydraConfig.get().runtime.output_dir))

    return task


COMMANDS: dict[str, tuple[str, Callable]] = {
    "train": ("train a model (continual pre-training or fine-tuning)", _task("run_training")),
    "plan": ("FLOPs, ideal SAT speed-up and memory of a configuration, without weights", _task("run_plan")),
    "bench": ("time dense and SAT training steps side by side on real batches", _task("run_benchmark")),
}
RUN_DIRS = {"plan": "outputs/plans", "bench": "outputs/bench"}


def _help() -> str:
    lines = ["usage: satrun <command> [key=value ...] [group=option ...] [-m] [--cfg job] [--help]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (text, _) in COMMANDS.items()]
    lines += ["", "config groups (choose with group=option):"]
    lines += [f"  {group:<8} {', '.join(group_options(group))}" for group in GROUPS]
    lines += ["", "examples:", "  satrun train", "  satrun train mode=sft data=chatterbot trainer.max_steps=200",
              "  satrun train -m optim.lr=1e-4,3e-4", "  satrun train --cfg job", "  satrun train --help",
              "  satrun plan model=llama2-7b trainer.seq_len=2048", "  satrun bench bench.rates=[0.3,0.5]"]
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _is_config_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (HydraException, OmegaConfBaseException))


def _run_hydra(task: Callable, name: str, args: list[str]) -> int:
    """Run ``task`` under Hydra; a failed job's exception is re-raised here once Hydra is done.

    Catching inside the job keeps Hydra from printing its own report, and lets the other jobs
    of a sweep run.
    """
    import hydra

    failures: list[Exception] = []

    def job(cfg):  # type: ignore[no-untyped-def]
        try:
            return task(cfg)
        except Exception as exc:
            if os.environ.get("SATRUN_DEBUG"):
                raise
            failures.append(exc)
            return None

    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us as exceptions, not printouts
    if name in RUN_DIRS and not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={RUN_DIRS[name]}/${{now:%Y-%m-%d_%H-%M-%S-%f}}"]
    sys.argv = [f"satrun {name}", *args]
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(job)()
    for exc in failures[:-1]:
        print(f"satrun {name}: job failed: {_one_line(exc)}", file=sys.stderr)
    if failures:
        raise failures[-1]
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"satrun: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return USAGE_EXIT
    from satrun.errors import RunStopped, UsageError

    _quiet_libraries()
    try:
        return _run_hydra(COMMANDS[command][1], command, rest)
    except Exception as exc:
        if os.environ.get("SATRUN_DEBUG"):
            raise
        if isinstance(exc, UsageError) or _is_config_error(exc):
            print(f"satrun {command}: error: {_one_line(exc)}", file=sys.stderr)
            return USAGE_EXIT
        if isinstance(exc, RunStopped):
            print(f"satrun {command}: {_one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        raise


def _quiet_libraries() -> None:
    """Library progress bars and advisory warnings would drown the run's own output."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=re.escape("torch.utils.checkpoint"))


def entry() -> None:
    sys.exit(main())
