"""The one exception type for bad input.

`InputError` means "what you gave is wrong" (a file, a dataset field, a config value, a
flag): the command line prints its message without a traceback and exits with code 2.
Any other exception is a bug or an environment problem and shows its traceback. It is a
`ValueError`, so code that catches ValueError keeps working.
"""


class InputError(ValueError):
    """Bad input; the message says what is wrong and where."""


class WorkerError(RuntimeError):
    """A worker process of a distributed run died or stopped answering: not bad input, so
    not an `InputError`; the command line prints the message and exits with code 3."""
