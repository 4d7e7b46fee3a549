"""A private, throw-away PostgreSQL cluster from the machine's own server binaries.

The bench starts one to give PostgreSQL cores of its own (``pg-issue``); the
tests start them where they need a server they may crash, replicate or
configure (tests/conformance/harnesses.py, tests/integration/test_store_failover.py).
Each cluster lives in a temporary directory on a free loopback port, with
SCRAM password authentication for its ``postgres`` superuser, and is deleted
on :meth:`PrivateCluster.stop`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from broker.bench.harness import free_port
from broker.templating import generate_password

__all__ = ["PrivateCluster", "cluster_dir", "cluster_os_user", "local_initdb"]


def local_initdb() -> str | None:
    """The machine's own ``initdb`` (PATH, else Debian's /usr/lib/postgresql/*/bin), if any.

    Symlinks are resolved: the directory must be the real bin directory, whose
    other tools (pg_ctl, pg_basebackup) callers run from beside it.
    """
    found = shutil.which("initdb")
    if found:
        return os.path.realpath(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return candidates[0] if candidates else None


def cluster_os_user() -> str | None:
    """Who runs a private cluster: None (this user), or "postgres" when we are root.

    initdb refuses to run as root. Raises LookupError when we are root and
    there is no postgres OS user to run it as instead.
    """
    if os.geteuid() != 0:
        return None
    pwd.getpwnam("postgres")  # KeyError (a LookupError) when there is none
    return "postgres"


def cluster_dir(prefix: str, user: str | None) -> str:
    """A new temporary directory owned by ``user`` (see :func:`cluster_os_user`)."""
    root = tempfile.mkdtemp(prefix=prefix)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    return root


@dataclass
class PrivateCluster:
    """One running private cluster; :meth:`start` makes it, :meth:`stop` removes it."""

    bindir: str
    root: str
    user: str | None
    port: int
    password: str

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    @classmethod
    def start(
        cls,
        *,
        initdb: str | None = None,
        settings: Mapping[str, str] | None = None,
        cpus: Iterable[int] | None = None,
        prefix: str = "broker-pg-",
    ) -> PrivateCluster:
        """initdb and start a cluster; ``settings`` are ``-c`` server options.

        ``cpus``: the CPUs the server (postmaster and every backend it forks) may
        run on. Raises LookupError when there are no server binaries or, as root,
        no postgres OS user; RuntimeError when a tool fails (with its stderr).
        """
        initdb = initdb or local_initdb()
        if initdb is None:
            raise LookupError("no PostgreSQL server binaries (initdb) on this machine")
        user = cluster_os_user()
        cluster = cls(os.path.dirname(initdb), cluster_dir(prefix, user), user, free_port(),
                      generate_password())
        try:
            cluster._init(initdb)
            options = " ".join([f"-p {cluster.port} -k {cluster.root}",
                                "-c listen_addresses=127.0.0.1",
                                *(f"-c {k}={v}" for k, v in (settings or {}).items())])
            cluster.run("pg_ctl", "-D", cluster.data, "-l", os.path.join(cluster.root, "log"),
                        "-w", "-o", options, "start", cpus=cpus)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _init(self, initdb: str) -> None:
        pwfile = os.path.join(self.root, "pw")
        # Written before the chown, readable by its owner only.
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            self.run(os.path.basename(initdb), "-D", self.data, "-A", "scram-sha-256",
                     "-U", "postgres", f"--pwfile={pwfile}", "-N", "-E", "UTF8",
                     "--no-locale")
        finally:
            os.unlink(pwfile)

    def run(self, tool: str, *args: str, cpus: Iterable[int] | None = None,
            check: bool = True) -> None:
        """Run one of the server's tools (``pg_ctl``, ...) as the cluster's OS user."""
        pinned = set(cpus) if cpus is not None else None

        def pin() -> None:  # in the child, before exec: inherited by what it forks
            if pinned is not None:
                os.sched_setaffinity(0, pinned)

        done = subprocess.run(  # noqa: S603 - the server's own tools, our arguments
            [os.path.join(self.bindir, tool), *args], user=self.user,
            capture_output=True, text=True, timeout=120,
            preexec_fn=pin if pinned is not None else None)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip() or done.stdout.strip()}")

    def stop(self) -> None:
        """Stop the server (immediately: it is thrown away) and delete its directory."""
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
