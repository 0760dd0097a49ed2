"""``satrun <command> [hydra overrides]``.

Hydra composes the config; errors are mapped to exit codes here: bad input (unknown key or
option, missing model or data, ...) prints one line and exits 2; a bug keeps its traceback.
``SATRUN_DEBUG=1`` shows the traceback of bad input too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

from satrun.cli import run_folder
from satrun.cli.configs import GROUPS, config_dir, group_options, keys_help, store_schema

USAGE_EXIT = 2


def _task(name: str) -> Callable:
    """A Hydra task running command ``name`` (:mod:`satrun.commands`): DictConfig in, typed config
    down; nothing below sees Hydra."""

    def task(cfg):  # type: ignore[no-untyped-def]
        from hydra.core.hydra_config import HydraConfig

        from importlib import import_module

        from satrun.config import from_dict

        command = import_module(f"satrun.commands.{name}")
        return command.run(from_dict(cfg), Path(HydraConfig.get().runtime.output_dir))

    return task


COMMANDS: dict[str, tuple[str, Callable]] = {
    "train": ("train a model (continual pre-training or fine-tuning)", _task("train")),
    "plan": ("FLOPs, ideal SAT speed-up and memory of a configuration, without weights", _task("plan")),
    "bench": ("time dense and SAT training steps side by side on real batches", _task("bench")),
    "probe": ("sub-network loss per metric and rate, layer sensitivity, calibrated per-layer rates", _task("probe")),
    "generate": ("text from a trained run's model (generate.run=<run folder>) or any configured model", _task("generate")),
    "eval": ("benchmarks (lm-evaluation-harness tasks) of a trained run's model (eval.run=<run folder>) or any configured model",
             _task("eval")),
}
RUN_DIRS = {"plan": "outputs/plans", "bench": "outputs/bench", "probe": "outputs/probes", "generate": "outputs/generations",
            "eval": "outputs/evals"}
# Each command's --help: (what it does, examples); the keys listed below them are train's, all of
# which the command reads (conf/train.yaml's hydra.help resolves ${satrun_help:...} from here).
HELP = {
    "train": ("continual pre-training (mode=cpt) or supervised fine-tuning (mode=sft) of a Hugging Face "
              "causal LM, with SAT's sparse steps as scheduled. Writes metrics.jsonl, checkpoints/, final/ "
              "and summary.json into the run folder.",
              ["satrun train model=tiny trainer.max_steps=20", "satrun train mode=sft data=chatterbot trainer.max_steps=200",
               "satrun train model=llama2-7b model.path=/models/Llama-2-7b-hf", "satrun train -m optim.lr=1e-4,3e-4"]),
    "plan": ("FLOPs per token, SAT's ideal speed-up per stage and over the run, and memory (per rank: "
             "plan.ranks, trainer.strategy) of a training configuration, from the model's shape alone: no "
             "weights, no data. Writes plan.json (default folder outputs/plans/<time>).",
             ["satrun plan model=llama2-7b trainer.seq_len=2048",
              "satrun plan model=llama2-13b trainer.strategy=fsdp plan.ranks=8"]),
    "bench": ("times plain, dense and SAT training steps side by side on real batches of the configured "
              "model and data (bench.rates, bench.steps, bench.repeats); writes bench.json and bench.png "
              "(default folder outputs/bench/<time>).",
              ["satrun bench bench.rates=[0.3,0.5]", "satrun bench model=tiny trainer.device=cpu"]),
    "probe": ("forward passes only: the sub-network loss per metric and uniform rate (probe.metrics, "
              "probe.rates), each layer's sensitivity, and with probe.target_speedup calibrated per-layer "
              "rates; writes probe.json, probe.png and conf/calibration/calibrated.yaml (default folder "
              "outputs/probes/<time>).",
              ["satrun probe", "satrun probe probe.target_speedup=1.3"]),
    "generate": ("greedy or sampled text for each prompt (generate.prompt, generate.prompt_file) from a run's "
                 "final/ model or checkpoint (generate.run) or the configured model, with the tokenizer's chat "
                 "template where it has one, streamed to the terminal; writes generations.jsonl (default folder "
                 "outputs/generations/<time>).",
                 ["satrun generate generate.run=outputs/cpt-1 generate.prompt='[What is SAT?]'",
                  "satrun generate mode=sft generate.prompt_file=prompts.txt generate.temperature=0.7"]),
    "eval": ("scores a run's final/ model, checkpoint or adapters (eval.run) or the configured model on "
             "lm-evaluation-harness tasks (eval.tasks; satrun's offline bible_cloze and chatterbot_mc by default, "
             "any harness task where the hub is reachable, your own with eval.include_path), in process; writes "
             "eval.json (the harness's results) and eval.md (default folder outputs/evals/<time>).",
             ["satrun eval eval.run=outputs/cpt-1 eval.tasks=[bible_cloze] eval.limit=100",
              "satrun eval model=llama2-7b model.path=/models/Llama-2-7b-hf eval.tasks=[mmlu,arc_easy,hellaswag]"]),
}
REPORT_USAGE = "usage: satrun report PATH... [--out DIR] (run folders or sweep folders)"
REPORT_HELP = f"""{REPORT_USAGE}

satrun report: a summary CSV (report.csv), loss curves (loss.png) and a tokens/s plot
(throughput.png) of finished runs, and a table on the terminal. PATH is a run folder or a
sweep folder (its jobs are found); the files go to --out, or to PATH when there is one.

examples:
  satrun report outputs/sweeps/2026-01-01_12-00-00-000000
  satrun report outputs/runs/a outputs/runs/b --out comparison"""


def _help() -> str:
    lines = ["usage: satrun <command> [key=value ...] [group=option ...] [-m] [--cfg job] [--help]",
             "       satrun --version", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (text, _) in COMMANDS.items()]
    lines += ["  report   summary CSV, loss curves and tokens/s plots of run or sweep folders (satrun report PATH...)"]
    lines += ["", "config groups (choose with group=option):"]
    lines += [f"  {group:<12} {', '.join(group_options(group))}" for group in GROUPS]
    lines += ["", "examples:", "  satrun train", "  satrun train mode=sft data=chatterbot trainer.max_steps=200",
              "  satrun train -m optim.lr=1e-4,3e-4", "  satrun train --cfg job", "  satrun train --help",
              "  satrun plan model=llama2-7b trainer.seq_len=2048", "  satrun bench bench.rates=[0.3,0.5]",
              "  satrun probe probe.target_speedup=1.3"]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import version

    return f"satrun {version('satrun')} (torch {version('torch')}, transformers {version('transformers')})"


def _command_help(name: str, part: str) -> str:
    """Resolver of conf/train.yaml's help texts: the running command's header or footer."""
    text, examples = HELP[name]
    if part == "header":
        return f"satrun {name}: {text}\nOverride with key=value, choose with group=option, sweep with -m."
    return "Examples:\n" + "\n".join(f"  {e}" for e in examples)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _is_config_error(exc: BaseException) -> bool:
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (HydraException, OmegaConfBaseException, yaml.YAMLError))


def _config_error(exc: BaseException) -> str:
    """One line for a config Hydra or YAML refused: the file and line, or the key, its value and
    what it expects (Hydra's own text names the override but not what is wrong with it)."""
    import yaml

    from satrun.config import unknown_key

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{mark.name}:{mark.line + 1}: not valid YAML: {exc.problem}" + (f" ({exc.context})" if exc.context else "")
    text = _one_line(exc)
    unknown = re.match(r"Could not (?:override|append to) '([^']+)'", text)
    if unknown:
        return unknown_key(unknown.group(1))
    merging = re.match(r"Error merging override (\S+?)=(.*)", text)
    if merging and exc.__cause__ is not None:
        key, value = merging.groups()
        reason = str(exc.__cause__).splitlines()[0]
        if "is not a ListConfig" in reason:
            reason = f"expects a list, e.g. {key}=[{value}]"
        return f"{key}={value}: {reason}"
    return text


def _run_hydra(task: Callable, name: str, args: list[str]) -> int:
    """Run ``task`` under Hydra. A failed job's exception is caught in the job (so Hydra prints
    no report of its own and the other jobs of a sweep still run): a single run re-raises it
    here; a sweep records it in the job's folder, writes the sweep summary and exits 1.
    """
    import hydra

    from satrun.errors import Interrupted, UsageError
    from satrun.report import ERROR_FILE
    from satrun.training.distributed import current

    def world_main() -> bool:
        return current().main

    failures: list[tuple[Path, Exception]] = []
    sweeps: list[Path] = []
    interrupted: list[Interrupted] = []

    def job(cfg):  # type: ignore[no-untyped-def]
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and not sweeps:
            sweeps.append(Path(hydra_cfg.sweep.dir))
        if interrupted:  # a signal stops the whole sweep: the remaining jobs do nothing
            return None
        single = hydra_cfg.mode != RunMode.MULTIRUN and world_main()
        try:
            result = task(cfg)
            if single and name == "train":  # a finished run that had nothing to do keeps its own .hydra and log
                run_folder.restore()
            return result
        except Exception as exc:
            refused = isinstance(exc, UsageError) and single and run_folder.restore()  # no error file: nothing started
            if os.environ.get("SATRUN_DEBUG"):
                raise
            if isinstance(exc, Interrupted):
                interrupted.append(exc)
                return None
            out = Path(hydra_cfg.runtime.output_dir)
            if not refused:
                (out / ERROR_FILE).write_text(_one_line(exc) + "\n", encoding="utf-8")
            failures.append((out, exc))
            return None

    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us as exceptions, not printouts
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args = _one_run_folder_for_all_ranks(name, args)
    elif name in RUN_DIRS and not any(a.startswith("hydra.run.dir=") for a in args):
        args = _with_overrides(args, [f"hydra.run.dir={RUN_DIRS[name]}/${{now:%Y-%m-%d_%H-%M-%S-%f}}"])
    args = _with_overrides(args, [f"+hydra.callbacks.run_folder._target_={run_folder.__name__}.RunFolderGuard"])
    sys.argv = [f"satrun {name}", *args]
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("satrun_help", lambda part: _command_help(name, part), replace=True)
    OmegaConf.register_new_resolver("satrun_keys", lambda *, _root_: keys_help(_root_), replace=True)
    store_schema()
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(job)()
    if interrupted:
        raise interrupted[0]
    if not sweeps:
        if failures:
            raise failures[-1][1]
        return 0
    if name == "train":
        _report([str(sweeps[0])])
    for out, exc in failures:
        print(f"satrun {name}: job {out.name} failed: {_one_line(exc)}", file=sys.stderr)
    return 1 if failures else 0


# Hydra's flags that take a value: the argument after one is not an override.
_VALUE_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c", "--package", "-p",
                "--experimental-rerun", "--info", "-i"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with ``extra`` overrides beside the user's own: Hydra's parser takes the overrides
    as one run of words, so they go before the first override (or last where there is none),
    never between a --flag and its value."""
    at, i = len(args), 0
    while i < len(args):
        word = args[i]
        if word.startswith("-"):
            takes = word in _VALUE_FLAGS and i + 1 < len(args)
            i += 2 if takes and (word not in ("--info", "-i") or args[i + 1] in _INFO_TOPICS) else 1
            continue
        at = i
        break
    return [*args[:at], *extra, *args[at:]]


def _one_run_folder_for_all_ranks(name: str, args: list[str]) -> list[str]:
    """Under torchrun every rank runs this command: join the process group, take the first
    rank's time stamp for the run folder, and let only the first rank write Hydra's files."""
    from datetime import datetime

    import torch.distributed as dist

    from satrun.errors import UsageError
    from satrun.training import distributed

    if "-m" in args or "--multirun" in args:
        raise UsageError("a sweep (-m) cannot run under torchrun; run the sweep's jobs one by one")
    world = distributed.init_from_env()
    if not any(a.startswith("hydra.run.dir=") for a in args):
        stamp = [datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")]  # the format of Hydra's own run folders
        dist.broadcast_object_list(stamp, src=0)
        args = _with_overrides(args, [f"hydra.run.dir={RUN_DIRS.get(name, 'outputs/runs')}/{stamp[0]}"])
    if not world.main:
        args = _with_overrides(args, ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"])
    return args


def _report(args: list[str]) -> int:
    """``satrun report PATH... [--out DIR]``: the summary CSV, plots and table of finished runs."""
    from satrun.errors import UsageError
    from satrun.report import find_runs, print_report, write_report

    out: Optional[Path] = None
    if "--out" in args:
        at = args.index("--out")
        if at + 1 >= len(args):
            raise UsageError("--out needs a folder")
        out, args = Path(args[at + 1]), args[:at] + args[at + 2 :]
    if any(a in ("-h", "--help") for a in args):
        print(REPORT_HELP)
        return 0
    if not args or any(a.startswith("-") for a in args):
        raise UsageError(REPORT_USAGE)
    paths = [Path(a) for a in args]
    rows, files = write_report(find_runs(paths), out or (paths[0] if len(paths) == 1 else Path(".")))
    print_report(rows)
    print("report written: " + ", ".join(str(f) for f in files))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if args[0] in ("-V", "--version"):
        print(_version())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS and command != "report":
        print(f"satrun: unknown command {command!r}; commands: {', '.join(COMMANDS)}, report", file=sys.stderr)
        return USAGE_EXIT
    from satrun.errors import RunStopped, UsageError

    _quiet_libraries()
    try:
        if command == "report":
            return _report(rest)
        return _run_hydra(COMMANDS[command][1], command, rest)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first), or a second one
        if os.environ.get("SATRUN_DEBUG"):
            raise
        print(f"satrun {command}: stopped by Ctrl-C (SIGINT); checkpoints already written are intact", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SATRUN_DEBUG"):
            raise
        if isinstance(exc, UsageError) or _is_config_error(exc):
            print(f"satrun {command}: error: {_one_line(exc) if isinstance(exc, UsageError) else _config_error(exc)}",
                  file=sys.stderr)
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
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in (*COMMANDS, "report") else None
    signal.signal(signal.SIGINT, lambda *_: _stop_at_once(command))  # the training loop takes Ctrl-C over while it runs
    code = 1
    try:
        code = main()
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:  # Ctrl-C before main could take it (e.g. while Python imports)
        print("satrun: stopped by Ctrl-C (SIGINT)", file=sys.stderr)
        code = 130
    finally:
        if code != 130:  # after a Ctrl-C a peer rank may never join the teardown: exit leaves the group
            _leave_process_group()
    if code == 130:
        # A Ctrl-C that lands inside code a library runs through PyRun_String leaves CPython
        # marked "killed by SIGINT", and sys.exit would then end the process by the signal
        # (status -2) rather than 130. Checkpoints are written or not by now: leave directly.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def _stop_at_once(command: Optional[str]) -> None:
    """Ctrl-C outside the training loop: one line and status 130, at once. A KeyboardInterrupt
    would not do: raised inside a finalizer (which imports run now and then), Python reports it
    with a traceback and carries on. Nothing is being saved here (the loop saves on its own
    Ctrl-C; a staging folder this cuts short is removed at the next start)."""
    line = f"satrun{' ' + command if command else ''}: stopped by Ctrl-C (SIGINT); checkpoints already written are intact\n"
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os.write(2, line.encode())
    os._exit(130)


def _leave_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
