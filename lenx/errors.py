"""User-facing errors: one line on stderr and exit code 2, never a traceback."""


class LenxError(Exception):
    """A mistake in the user's input. The message names the problem and the fix."""

    exit_code = 2


class LengthNotSupported(Exception):
    """A scheme cannot represent a sequence this long (e.g. learned positions past their table)."""


def first_line(e: BaseException) -> str:
    """An exception as one short line for a user-facing message: its type and the first line of its text."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def did_you_mean(value, known) -> str:
    """' (did you mean 'x'?)' for the known name closest to a mistyped one (case ignored), else ''."""
    import difflib

    by_lower = {str(k).lower(): str(k) for k in known}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=0.75)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close and by_lower[close[0]] != str(value) else ""


OOM_NOTE = "out of memory"


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")
    )


def oom_note(eval_len: int, device: str) -> str:
    return f"{OOM_NOTE} at length {eval_len} on {device} (one window at a time); rerun on a larger device"
