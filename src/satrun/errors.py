"""Errors that mean "the user asked for something that cannot work".

The CLI turns a :class:`UsageError` into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input (config, model, data): reported as one line, exit status 2."""


class RunStopped(Exception):
    """Training stopped before its last step, on purpose; reported as one line with ``exit_code``."""

    exit_code = 1


class Interrupted(RunStopped):
    """SIGINT or SIGTERM: the step in flight was finished and a checkpoint saved."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class NonFiniteLoss(RunStopped):
    """The loss or the gradients became NaN or infinite more often than allowed."""


class DiskFull(RunStopped):
    """A checkpoint or model folder could not be written: the disk (or quota) is full."""


class OutOfMemory(UsageError):
    """A step did not fit in the device's (or host's) memory: the settings ask for too much."""
