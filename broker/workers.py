"""``[server] workers = N``: N server processes on one listening socket and one store.

One broker process runs its request handling on one core (the GIL). With
``workers = N`` the process that reads the config binds the listener once and
forks N workers that all accept on it (the kernel spreads connections between
them). Each worker is a whole broker, exactly as replicas on one PostgreSQL
are (docs/operations.md): its own store connections and sweeper, its own
audit file, chained on its own (``audit.jsonl`` becomes ``audit.w1.jsonl``,
``audit.w2.jsonl`` ...). The store is what they share: leases, tokens, claims.
On a SQLite store their group commits take turns under an flock
(``broker.store.sqlite_writer._WriteLock``).

This supervisor does nothing else: it forwards SIGTERM, SIGINT and SIGHUP to
the workers, restarts a worker that dies (not one that crash-loops), and
exits once every worker has. It also restarts a worker that is alive but
stuck: each worker's event loop stamps a heartbeat once a second (the
metrics board, broker/worker_stats.py), and a worker whose last beat is
older than ``[server] worker_stall_timeout`` (a loop blocked by a plugin's
synchronous call, a deadlock, a stopped process) is sent SIGKILL, since a
stuck loop would never run a SIGTERM handler, and started again. Its
connections are cut; the leases it had claimed go to the other workers when
their claims run out, as after any crash.

On SIGHUP the supervisor also reads the config again, as the workers do, so
that a worker it restarts later runs what the others were reloaded to, not
the config the broker started with. A worker whose supervisor dies is sent
SIGTERM by the kernel (Linux), so no orphan keeps serving.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType

__all__ = ["REUSE_PORT", "listen_socket", "supervise", "worker_audit_path"]

log = logging.getLogger(__name__)

#: A worker that dies sooner than this after its start counts as crash-looping.
_MIN_UPTIME = 5.0
#: After this many quick deaths in a row the supervisor stops everything.
_MAX_QUICK_DEATHS = 5
#: How often the supervisor looks for exited workers, and for stalled ones (seconds).
_POLL = 0.25
_STALL_CHECK = 1.0
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def worker_audit_path(path: str, worker: int) -> str:
    """``/var/log/broker/audit.jsonl`` -> ``/var/log/broker/audit.w2.jsonl``."""
    root, ext = os.path.splitext(path)
    return f"{root}.w{worker}{ext}"


#: Each worker listens on a socket of its own on the same port, and the kernel
#: spreads new connections between them by hash. With one shared listener the
#: split depends on which worker wakes first, and keep-alive clients stay
#: wherever they landed.
#: Linux only: elsewhere (macOS, BSD) SO_REUSEPORT lets sockets share a port
#: but does not balance connections between them, so the workers share one.
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def listen_socket(host: str, port: int, *, listen: bool = True,
                  reuse_port: bool = REUSE_PORT) -> socket.socket:
    """A socket bound to the listen address (listening unless ``listen`` is False).

    With :data:`REUSE_PORT` the supervisor holds a bound socket that does not
    listen (it keeps the port, and a bad address fails before any fork), and
    every worker binds and listens on its own; without, the supervisor's one
    listener is inherited by every worker. A single process passes
    ``reuse_port=False``: then a second broker on the same port cannot bind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(workers: int, serve: Callable[[int], int],
              reload: Callable[[], None] | None = None, *,
              heartbeat: Callable[[int, int], float | None] | None = None,
              stall_timeout: float = 0.0) -> int:
    """Fork ``workers`` processes running ``serve(worker_number)``; wait for them all.

    ``reload`` runs in the supervisor on every SIGHUP, after the signal went
    on to the workers. ``heartbeat(worker, pid)`` is the ``time.monotonic()``
    of that process's last beat, None before its first; a worker silent for
    more than ``stall_timeout`` seconds (0: never) is killed and restarted.
    Returns 0 when every worker stopped cleanly after a signal, 1 otherwise.
    """
    parent = os.getpid()
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker number, started)
    stopping = False
    quick_deaths = 0
    failed = False

    def spawn(worker: int) -> None:
        # The forwarded signals wait until the new worker is in ``children``:
        # a SIGHUP handled between the fork and that would neither reach the
        # new worker nor be in the config it was forked with.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                children.clear()  # in case a supervisor's handler still ran here
                try:
                    for sig in _FORWARDED:
                        signal.signal(sig, signal.SIG_DFL)
                    # SIGHUP's default action ends the process: it stays held back (not
                    # lost) until the worker's own handler is in place
                    # (broker.server._serve), so a reload sent while a worker starts
                    # does not kill it.
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
                    _die_with_parent(parent)
                    code = serve(worker)
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = (worker, time.monotonic())
        finally:  # not reached in the worker: it leaves through os._exit
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        # Python runs this handler between two bytecodes of the main thread,
        # not inside the C signal handler, so reading a file and logging here
        # is safe (logging's locks are re-entrant). Reading it now, not when a
        # worker is next started, gives that worker the file the others read.
        if signum == signal.SIGHUP and reload is not None and children:
            reload()

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    for worker in range(1, workers + 1):
        spawn(worker)
    log.info("supervisor %d: %d workers started", parent, workers)
    checked = time.monotonic()
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:  # nobody exited: look for a stuck worker now and then, wait a little
            if (heartbeat is not None and stall_timeout > 0 and not stopping
                    and time.monotonic() - checked >= _STALL_CHECK):
                checked = time.monotonic()
                _kill_stalled(children, heartbeat, stall_timeout)
            time.sleep(_POLL)
            continue
        if pid not in children:
            continue
        worker, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            # A worker still starting has no handler yet: the forwarded SIGTERM or
            # SIGINT ends it by its default action, with nothing in flight to
            # drain. That is the stop asked for, not a failure (systemd would
            # report the unit failed).
            failed = failed or code not in (0, -signal.SIGTERM, -signal.SIGINT)
            continue
        quick_deaths = quick_deaths + 1 if time.monotonic() - started < _MIN_UPTIME else 0
        if quick_deaths >= _MAX_QUICK_DEATHS:
            log.error("worker %d exited (%d) %d times in a row within %gs of starting; "
                      "stopping the broker", worker, code, quick_deaths, _MIN_UPTIME)
            failed = True
            forward(signal.SIGTERM, None)
            continue
        log.warning("worker %d (pid %d) exited with %d; starting it again", worker, pid, code)
        if quick_deaths:
            time.sleep(1.0)
        if not stopping:  # a signal may have come during the pause
            spawn(worker)
    return 1 if failed else 0


def _kill_stalled(children: dict[int, tuple[int, float]],
                  heartbeat: Callable[[int, int], float | None], stall_timeout: float) -> None:
    """SIGKILL every worker whose heartbeat is older than ``stall_timeout``.

    A worker is watched from its first beat on: before it, it is starting
    (opening the store, perhaps migrating a large one), which may take longer
    than any timeout and must not be cut short and retried forever. The kill
    is reaped (and the worker started again) by the wait loop like any death.
    """
    now = time.monotonic()
    for pid, (worker, _started) in list(children.items()):
        beat = heartbeat(worker, pid)
        if beat is None:
            continue
        silent = now - beat
        if silent <= stall_timeout:
            continue
        log.error("worker %d (pid %d) has not run its event loop for %.0fs "
                  "(worker_stall_timeout %gs): killing it", worker, pid, silent, stall_timeout)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
