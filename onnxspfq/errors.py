"""The one exception type for bad user input: the CLI prints its message on one line and exits non-zero."""


class OnnxspfqError(ValueError):
    """A problem with the user's input; the message names the problem and the fix."""
