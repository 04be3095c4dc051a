"""One exception type for bad user input, so the CLI can print it as a single line."""


class InputError(ValueError):
    """Bad input from a user: a file, a config field, a checkpoint or a client update.

    The message must name the offending file or field; the CLI prints it on one line.
    """


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the message names the stage, epoch and step."""


class DataUnavailable(InputError):
    """A node's private data could not be loaded: the detail (paths) stays at the node."""
