"""`python -m cortex.child_launch PARENT_PID ARGV...`: make this process die with PARENT_PID, then
exec ARGV (a Python module's command line: `-m neuron.cli serve ...`).

This replaces a `preexec_fn` that would set the same thing between fork and exec: Python code run
in the child of a process with live gRPC threads can deadlock on locks those threads held at fork
time. Here the child is started with no Python between fork and exec, and sets PR_SET_PDEATHSIG
itself; the setting survives the exec below. If the parent died before it was set, exit at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
    if os.getppid() != parent:
        return 1  # the launching process is already gone: nobody would stop this server
    os.execv(sys.executable, [sys.executable, *command])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
