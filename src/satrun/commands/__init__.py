"""One module per command, each the wiring from typed config to the parts that do the work.

Each has ``run(cfg, run_dir)``; the CLI (:mod:`satrun.cli.main`) maps a command name to it.
"""
