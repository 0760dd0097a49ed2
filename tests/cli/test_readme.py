"""Every `satrun ...` command line in README.md composes (``--cfg job``): the README stays true."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from satrun.cli.configs import config_dir
from satrun.cli.main import main

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    """The arguments after `satrun` of each command line in README's bash blocks (also the
    `python -m satrun` and `torchrun ... -m satrun` forms), continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        match = re.search(r"(?:^|\s)(?:-m |python -m )?satrun (.*)$", line.strip())
        if not match or not (line.strip().startswith(("satrun", "python", "torchrun"))):
            continue
        commands.append([t for t in shlex.split(match.group(1), comments=True) if t != "..."])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands() -> None:
    assert len(COMMANDS) >= 20 and any(c[0] == "plan" for c in COMMANDS) and any("-m" in c for c in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_composes(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    probe = tmp_path / "outputs" / "probes" / "<time>" / "conf" / "calibration"  # what satrun probe writes
    probe.mkdir(parents=True)
    shutil.copy(config_dir() / "calibration" / "smollm2-135m_cpt_ladder_none.yaml", probe / "calibrated.yaml")
    if args[0] == "report":
        assert main(["report", "--help"]) == 0
        return
    for job in sweep_jobs(args):
        if not {"--help", "--cfg"} & set(job):
            job = [*job, "--cfg", "job"]
        try:
            code = main(job)
        except SystemExit as exc:  # Hydra's --help ends with sys.exit(0)
            code = exc.code
        out = capsys.readouterr()
        assert code == 0, out.err


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """A sweep (-m) as its jobs' command lines (``key=a,b`` gives one job per value)."""
    if "-m" not in args:
        return [args]
    jobs: list[list[str]] = [[]]
    for arg in (a for a in args if a != "-m"):
        key, _, values = arg.partition("=")
        options = values.split(",") if "," in values and not values.startswith("[") else [values]
        jobs = [[*job, f"{key}={value}" if _ else arg] for job in jobs for value in options]
    return jobs
