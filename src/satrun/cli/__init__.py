"""The ``satrun`` command line: the only place that knows about Hydra."""
