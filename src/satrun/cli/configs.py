"""Where the Hydra configs live, whether satrun runs from a checkout or an installed wheel."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import satrun

GROUPS = ("model", "data", "mode", "optim", "adapter", "metric", "selector", "scheduler", "calibration", "logger", "launcher")


def config_dir() -> Path:
    """``satrun/conf`` inside an installed wheel, else the checkout's top-level ``conf/``."""
    package = Path(satrun.__file__).resolve().parent
    for candidate in (package / "conf", package.parent.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"satrun's configs are missing (looked in {package / 'conf'})")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def store_schema() -> None:
    """The typed config as Hydra's schema (``satrun_schema``, first in conf/train.yaml's
    defaults): every key the dataclasses define can be set with key=value, a mistyped value is
    refused, and the dataclass defaults are the defaults."""
    from hydra.core.config_store import ConfigStore

    from satrun.config import TrainConfig

    ConfigStore.instance().store(name="satrun_schema", node=TrainConfig)


def keys(cls: type, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every key of the config dataclass ``cls`` (dotted) and its one-line description: the
    comment that ends the field's line in the source, the one place a key is defined."""
    comments = dict(re.findall(r"^\s+(\w+):[^\n=]*=[^\n#]*#\s*(.*)$", inspect.getsource(cls), re.M))
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            yield from keys(kind, f"{prefix}{field.name}.")  # type: ignore[arg-type]
        else:
            yield f"{prefix}{field.name}", comments.get(field.name, "")


def keys_help(composed: Any) -> str:
    """``--help``'s list of keys: each with its value as composed and its description."""
    from omegaconf import OmegaConf

    from satrun.config import TrainConfig

    lines = []
    for key, text in keys(TrainConfig):
        value = OmegaConf.select(composed, key, default=None)
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        shown = "null" if shown is None else str(shown).lower() if isinstance(shown, bool) else shown
        lines.append(f"  {key}={shown}".ljust(44) + f"  {text}".replace("$", "$$"))
    return "\n".join(lines)
