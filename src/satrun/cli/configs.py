"""Where the Hydra configs live, whether satrun runs from a checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path

import satrun

GROUPS = ("model", "data", "mode", "optim", "metric", "selector", "scheduler", "logger", "launcher")


def config_dir() -> Path:
    """``satrun/conf`` inside an installed wheel, else the checkout's top-level ``conf/``."""
    package = Path(satrun.__file__).resolve().parent
    for candidate in (package / "conf", package.parent.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"satrun's configs are missing (looked in {package / 'conf'})")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
