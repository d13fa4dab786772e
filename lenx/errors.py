"""User-facing errors: one line on stderr and exit code 2, never a traceback."""


class LenxError(Exception):
    """A mistake in the user's input. The message names the problem and the fix."""

    exit_code = 2


class LengthNotSupported(Exception):
    """A scheme cannot represent a sequence this long (e.g. learned positions past their table)."""
