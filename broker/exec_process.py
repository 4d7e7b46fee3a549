"""``broker exec`` as a process: its stderr, the signals it forwards to the command, the
command's exit code, and keeping exec's secrets out of the command's reach."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import Any

__all__ = ["FORWARDED", "exit_code"]

#: signals forwarded to the command. SIGUSR1/SIGUSR2 too: commands use them
#: (reopen logs, dump state), and their default action would kill exec without
#: revoking anything.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
#: signals a terminal sends to its whole foreground process group (Ctrl-C, Ctrl-\).
_TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


# --------------------------------------------------------------------------- output

#: Re-entrant: the signal handler says something during the cleanup, and it runs in
#: the main thread, which may be inside _say already (blocked on a full stderr pipe).
_out_lock = threading.RLock()


def _say(message: str) -> None:
    """One line on stderr. Never raises: a log reader that went away (``2>&1 | head``,
    a closed CI log stream) must not stop exec from running the command, renewing
    its leases and revoking them; the message is lost, the run goes on."""
    with _out_lock:
        try:
            sys.stderr.write(f"broker: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _when(ts: float) -> str:
    # UTC: CI logs and the broker's audit log both are.
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%SZ")


# --------------------------------------------------------------------------- signals


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminal_sent_it() -> bool:
    """True when we run in the foreground of a terminal: a Ctrl-C there reached the
    whole process group, the command included, and must not be sent twice."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


class _Forwarder:
    """The signal handler, by phase.

    setup: interrupt (``_Signalled``): nothing runs yet; issued leases are revoked.
    running: forward the signal to the command; exec keeps waiting for it.
    cleanup: the first signal is noted and ignored (it is often the same one that
    just ended the command, sent to the whole process group); a second one
    interrupts the cleanup.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.phase = "setup"
        self.pending: list[int] = []
        self._noted = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in FORWARDED:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.phase == "running":
            if self.child is None:  # between "running" and Popen returning
                self.pending.append(signum)
            else:
                self.forward(signum)
        elif self.phase == "cleanup" and not self._noted:
            self._noted = True
            _say(f"got {signal.Signals(signum).name} while revoking the leases; "
                 "send it again to stop revoking")
        else:
            raise _Signalled(signum)

    def forward(self, signum: int) -> None:
        assert self.child is not None
        if signum in _TERMINAL_SIGNALS and _terminal_sent_it():
            return
        try:
            self.child.send_signal(signum)
        except ProcessLookupError:
            pass


#: prctl(2) option: whether the process may be core-dumped, ptrace-attached, and its
#: /proc/PID/environ and /proc/PID/mem read by other processes of the same user.
_PR_SET_DUMPABLE = 4


def _hide_from_the_command() -> None:
    """Make exec's own memory and environment unreadable to the command it runs.

    The command runs as the same user: without this it can read the JWT and a
    ``BROKER_TOKEN`` exec keeps from its environment in ``/proc/$PPID/environ``
    (and the login token from ``/proc/$PPID/mem`` where ptrace is not restricted).
    A process that is not dumpable has its ``/proc`` entries owned by root; the
    flag is reset by execve, so the command itself is unaffected. It also keeps
    the secrets out of core dumps. Linux only; elsewhere (or if it fails) a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
