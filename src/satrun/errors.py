"""Errors that mean "the user asked for something that cannot work".

The CLI turns a :class:`UsageError` into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input (config, model, data): reported as one line, exit status 2."""
