"""Started by torchrun on each rank: ``satrun train`` once per job of a plan, in one interpreter
per rank, so that many two-rank runs pay for one launch (the ranks join the process group in the
first run and stay in it: ``satrun.cli.main.main`` leaves the group to its caller).

    python -m torch.distributed.run --nproc_per_node=2 ranks.py PLAN

PLAN is a JSON list of ``{"name": ..., "args": [...]}``; each job runs in the folder
``<PLAN's folder>/<folder or name>``, and ``{run:NAME}`` in an argument becomes the run folder of
the earlier job NAME. The ranks wait for each other after each job; the first rank writes each
job's exit status to ``<PLAN's folder>/status.json`` as it ends. A job that fails ends the launch
(torchrun then stops the other rank, which may be waiting for it in a collective)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run_folder(job: Path) -> Path:
    """The one run folder a job wrote: its hydra.run.dir, or the default one it chose."""
    runs = [p.parent for p in job.rglob("metrics.jsonl")]
    assert len(runs) == 1, f"{job}: {len(runs)} run folders"
    return runs[0]


def main(plan_file: Path) -> int:
    import torch.distributed as dist

    from satrun.cli.main import main as satrun

    root, plan = plan_file.parent, json.loads(plan_file.read_text())
    folders = {job["name"]: root / job.get("folder", job["name"]) for job in plan}
    statuses: dict[str, int] = {}
    for job in plan:
        args = list(job["args"])
        for name in statuses:
            if any(f"{{run:{name}}}" in arg for arg in args):
                args = [arg.replace(f"{{run:{name}}}", str(run_folder(folders[name]))) for arg in args]
        folders[job["name"]].mkdir(exist_ok=True)
        os.chdir(folders[job["name"]])
        try:
            code = satrun(["train", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        statuses[job["name"]] = code
        if code == 0 and dist.is_initialized():
            dist.barrier()  # the first rank has written the job's final model too
        if os.environ.get("RANK") == "0":
            (root / "status.json").write_text(json.dumps(statuses))
        if code != 0:
            print(f"job {job['name']} ended with status {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
