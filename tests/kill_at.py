"""`python tests/kill_at.py ARGS`: `lenx ARGS`, SIGKILLed at one file write, as a power cut or the OOM killer
would stop it (no cleanup runs). LENX_TEST_KILL:
  before-replace:K   just before the K-th os.replace of the process (a file or checkpoint written, not in place);
  after-replace:K    just after it (in place, the writes that follow it not made).
Every file lenx writes atomically, and every checkpoint, is put in place by os.replace, so K = 1, 2, ... walks
through every write of a run (test_robustness.py starts it)."""

import os
import signal
import sys

from lenx.cli import main

where, k = os.environ["LENX_TEST_KILL"].split(":")
if where not in ("before-replace", "after-replace"):
    raise SystemExit(f"unknown LENX_TEST_KILL {where!r}")
replace, calls = os.replace, [0]


def replace_then_maybe_die(src, dst, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(k) and where == "before-replace":
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst, *args, **kwargs)
    if calls[0] == int(k):
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace_then_maybe_die
sys.exit(main())
