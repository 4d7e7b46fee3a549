"""The lease engine's mounts: built from the config, probed, rebuilt when their
password file changes, swapped on a reload.

A mount is a ``MountRuntime`` (a backend wrapped with timing, metrics and
redaction). Swaps happen under one lock, so a reload and a followed password
file never replace the same mount at once; a replaced backend is closed once
the new one is in place.

``MountSet`` is a base class of ``broker.engine.LeaseEngine``, which holds the
state it uses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import urlsplit

from broker.backend import BackendError, MountSpec, RoleSpec, load_plugin
from broker.config import Config, read_secret_file
from broker.errors import NotFound
from broker.lease import LeaseFilter, LeaseState
from broker.middleware import MountRuntime
from broker.store.base import LeaseStore

__all__ = ["MountSet"]

#: The engine's logger: these lines were the engine's before the split (and still are).
log = logging.getLogger("broker.engine")

#: Leases a backend still has to revoke (tombstones are done with it).
LIVE_STATES = (LeaseState.PENDING, LeaseState.ACTIVE, LeaseState.REVOKING,
               LeaseState.IRREVOCABLE)


#: Longest start-up and a reload wait for a mount's connection before going on without
#: it. A backend that answers does so well within it, a remote one over TLS (AWS STS,
#: a managed database) on a loaded machine included: 1 s, a request's REQUEST_WAIT,
#: left such a mount unhealthy at start-up and its first requests a 503. One that hangs
#: (accepts TCP, never answers) held start-up, and each reload, for backend_timeout
#: (30 s by default). Its attempt goes on in the background (up to backend_timeout),
#: the mount unhealthy until it succeeds.
CONNECT_WAIT = 5.0

#: Irrevocable leases retried at once when their mount is healthy again; more wait
#: for the irrevocable job (or an operator's revoke of each, docs/operations.md).
REQUEUE_ON_RECOVERY = 10_000


class MountSet:
    """The engine's mounts by name (a LeaseEngine base)."""

    config: Config
    store: LeaseStore
    mounts: dict[str, MountRuntime]
    wake: Callable[[float | None], None]
    clock: Callable[[], float]
    #: per mount, the password_file content that failed to verify (not tried again)
    #: and the last problem logged about the file (logged once).
    _refused_secrets: dict[str, str]
    _password_file_notes: dict[str, str]
    #: held while mounts are swapped (a reload, a password file followed)
    _mounts_lock: asyncio.Lock

    def _build_mount(self, name: str, config: Config) -> MountRuntime:
        spec = config.mounts[name]
        backend = load_plugin(spec.plugin).from_config(spec)
        return MountRuntime(spec=spec, backend=backend, timeout=config.leases.backend_timeout)

    async def start_mounts(self) -> None:
        """Build every mount and connect, all at once, waiting at most CONNECT_WAIT.

        An unreachable backend leaves its mount unhealthy; one that has not answered
        by then too, while its attempt goes on in the background.
        """
        for name in self.config.mounts:
            self.mounts[name] = self._build_mount(name, self.config)
        await _connect_within(list(self.mounts.values()), CONNECT_WAIT, "start-up")

    async def check_mounts(self) -> None:
        """The mount-health job: retry refused password files of failing mounts, probe all.

        A mount that is healthy again gets its irrevocable leases retried now: an
        outage longer than the revocation retries made them irrevocable, and the
        irrevocable job would try again only after ``irrevocable_retry_interval``
        (an hour by default), the credentials alive all the while (day-2 QA).
        """
        await self._follow_password_files(retry_refused=True)
        runtimes = list(self.mounts.values())
        recovered = await asyncio.gather(*(m.check() for m in runtimes))
        names = [m.name for m, back in zip(runtimes, recovered, strict=True) if back]
        if names:
            requeued = await self.store.requeue_irrevocable(
                now=self.clock(), limit=REQUEUE_ON_RECOVERY, mounts=names)
            if requeued:
                log.info("retrying %d irrevocable lease(s) of %s, healthy again",
                         requeued, ", ".join(sorted(names)))
                self.wake(None)

    async def follow_password_files(self) -> None:
        """The password-file job (every second): a mount whose file changed is rebuilt with it."""
        await self._follow_password_files(retry_refused=False)

    async def _follow_password_files(self, *, retry_refused: bool) -> None:
        for name, runtime in list(self.mounts.items()):
            if runtime.spec.secret_file is None:
                continue
            try:
                # Not under the mounts lock: verifying the new secret may take up to
                # backend_timeout against a hung backend, and a reload would wait for
                # it. Only the swap itself takes the lock.
                await self._follow_password_file(name, runtime, retry_refused=retry_refused)
            except Exception as exc:
                # One mount's file must not stop the others', nor the health
                # checks that check_mounts runs after this.
                self._note_password_file(
                    name, f"following {runtime.spec.secret_file} failed: "
                          f"{type(exc).__name__}: {exc}", failure=exc)

    async def _follow_password_file(self, name: str, runtime: MountRuntime, *,
                                    retry_refused: bool) -> None:
        """Rebuild the mount with its ``password_file``'s new content, if it changed.

        The file is where the admin secret lives (docs/operations.md): a rotation
        by another worker or replica, an operator or a secret manager (a
        Kubernetes Secret is updated in place) is picked up within a second, no
        SIGHUP needed. The new mount replaces the running one only once it
        verifies; a half-written or wrong file leaves the running mount alone,
        and is reported once per content. A refused content is tried again only
        by the health job (``retry_refused``), and only once the running mount
        fails too: not a login attempt every second.
        """
        spec = runtime.spec
        assert spec.secret_file is not None
        try:
            content = await asyncio.to_thread(read_secret_file, spec.secret_file)
        except OSError as exc:
            self._note_password_file(name, f"cannot read {spec.secret_file}: "
                                           f"{exc.strerror or exc}")
            return
        if content == spec.secret:
            self._password_file_notes.pop(name, None)  # fine again: a new problem is news
            return
        if not content.strip():
            # Emptied (truncated before a rewrite, or by mistake): not a secret to try.
            self._note_password_file(name, f"{spec.secret_file} is empty; still using the "
                                           "old secret")
            return
        if content == self._refused_secrets.get(name) and (runtime.healthy or not retry_refused):
            return  # tried and refused; tried again once the running mount fails too
        candidate = replace(spec, secret=content)
        fresh = self._build_mount(
            name, replace(self.config, mounts={**self.config.mounts, name: candidate}))
        refused = await _verify_quietly(fresh)
        if refused is not None:
            # Never swapped in unverified, even while the running mount fails: that
            # failure may be the server being down, and the mount would stay on a
            # refused secret once it is back (day-2 QA). The health job tries the
            # file again while the running mount fails.
            await fresh.close()
            self._refused_secrets[name] = content
            message = (f"{spec.secret_file} changed, but the backend refuses it ({refused}); "
                       "still using the old secret")
            if runtime.healthy:  # the server answered, and said no: the file needs a look
                self._note_password_file(name, message)
            else:  # nothing tells a refusal from the outage the mount is already reported in
                log.info("mount %s: %s (tried again while the mount is unhealthy)", name,
                         message)
            return
        async with self._mounts_lock:  # not while a reload swaps mounts
            # Replaced by a reload meanwhile, or its secret rotated here (rotate-root
            # sets the running spec's): the file read is no longer the news.
            if self.mounts.get(name) is not runtime or runtime.spec is not spec:
                await fresh.close()
                return
            self.mounts = {**self.mounts, name: fresh}
            # The running config, which a reload may have changed meanwhile (this
            # mount's spec it did not change, or it would have replaced the runtime).
            self.config = replace(self.config, mounts={**self.config.mounts, name: candidate})
        self._refused_secrets.pop(name, None)
        # An outage of the running mount ends here: said, and its irrevocable
        # leases retried by the next health probe, as when it reconnects.
        fresh.replaces(runtime)
        log.warning("mount %s: %s changed; the mount now uses the new secret", name,
                    spec.secret_file)
        await runtime.close()

    def _note_password_file(self, name: str, message: str, *,
                            failure: Exception | None = None) -> None:
        if self._password_file_notes.get(name) != message:  # once per distinct problem
            self._password_file_notes[name] = message
            log.warning("mount %s: %s", name, message, exc_info=failure)

    async def reload(self, config: Config) -> list[str]:
        """Swap in a new config. Unchanged mounts keep their live backend; leases are untouched.

        Returns what changed, for the log. Leases of a removed mount stay in the
        store: this replica no longer claims them (a replica that has the mount
        revokes them) until the mount comes back or an operator forces them.
        """
        async with self._mounts_lock:
            return await self._reload(config)

    async def _reload(self, config: Config) -> list[str]:
        changes: list[str] = []
        old = self.mounts
        config = await self._keep_mounts_with_live_leases(config, changes)
        new: dict[str, MountRuntime] = {}
        for name, spec in config.mounts.items():
            current = old.get(name)
            if current is not None and current.spec == spec:
                new[name] = current
                continue
            new[name] = self._build_mount(name, config)
            changes.append(f"mount {name} {'changed' if current else 'added'}")
        await _connect_within([m for n, m in new.items() if n not in old or old[n] is not m],
                              CONNECT_WAIT, "reload")
        self.mounts, self.config = new, config
        if set(new) - set(old):
            self.wake(None)  # the leases of an added mount are ours to claim now
        for name, runtime in old.items():
            if new.get(name) is not runtime:
                if name not in new:
                    changes.append(f"mount {name} removed")
                await runtime.close()
        return changes

    async def _keep_mounts_with_live_leases(self, config: Config,
                                            changes: list[str]) -> Config:
        """``config``, less the plugin changes of mounts that have live leases.

        A lease's revocation data is the backend's that issued it: revoked by
        another plugin, it would fail (or, worse, act on a name that means
        something else there). So a mount whose ``plugin`` changes while it
        has live leases keeps its running spec and backend (an error names the
        mount and the count); revoke its leases, then reload again. A removed
        mount is let go (the reload goes through) with a warning naming its
        live leases: this replica no longer revokes them (see :meth:`reload`).
        """
        kept: dict[str, MountSpec] = {}
        for name, runtime in self.mounts.items():
            spec = config.mounts.get(name)
            if spec is not None and spec.plugin == runtime.spec.plugin:
                await self._warn_of_a_move(name, runtime.spec, spec, changes)
                continue
            try:
                live = await self.store.count_matching(LeaseFilter(prefix=f"{name}/"),
                                                       states=LIVE_STATES)
            except Exception as exc:
                if spec is None:
                    log.warning("reload: mount %s removed; its live leases could not be "
                                "counted (%s: %s)", name, type(exc).__name__, exc)
                    continue
                log.error("reload: mount %s: plugin change from %s to %s refused: its live "
                          "leases could not be counted (%s: %s); the mount keeps its running "
                          "config", name, runtime.spec.plugin, spec.plugin,
                          type(exc).__name__, exc)
                kept[name] = runtime.spec
                changes.append(f"mount {name} plugin change refused")
                continue
            if not live:
                continue
            if spec is None:
                log.warning("reload: mount %s removed with %d live lease(s): this replica no "
                            "longer renews or revokes them (a replica that has the mount "
                            "does; add it back, or end them with sys/leases/revoke-force/%s/)",
                            name, live, name)
                continue
            log.error("reload: mount %s: plugin change from %s to %s refused: %d live "
                      "lease(s) of the mount would be revoked by the wrong backend; the mount "
                      "keeps its running config (revoke them first, e.g. "
                      "sys/leases/revoke-prefix/%s/, then reload)", name, runtime.spec.plugin,
                      spec.plugin, live, name)
            kept[name] = runtime.spec
            changes.append(f"mount {name} plugin change refused ({live} live lease(s))")
        if not kept:
            return config
        return replace(config, mounts={**config.mounts, **kept})

    async def _warn_of_a_move(self, name: str, old: MountSpec, new: MountSpec,
                              changes: list[str]) -> None:
        """Warn when a mount with live leases now points at another server.

        Its leases are revoked on the new one, where their users do not exist:
        a delete of a missing user is a success, so they would end as revoked
        while their users lived on, on the old server (day-2 QA). Not refused:
        a new name for the same server (a DNS move, a failover address) is
        legitimate, and the broker cannot tell the two apart.
        """
        before, after = _server(old), _server(new)
        if before == after:
            return
        try:
            live = await self.store.count_matching(LeaseFilter(prefix=f"{name}/"),
                                                   states=LIVE_STATES)
        except Exception:
            live = -1  # unknown: still worth the warning
        if not live:
            return
        count = "its live leases" if live < 0 else f"its {live} live lease(s)"
        log.warning("reload: mount %s now points at %s (was %s): %s will be revoked there; "
                    "if their users were made on %s, they would be counted as revoked and "
                    "live on (revoke them before moving a mount, or move it back and "
                    "revoke them)", name, after, before, count, before)
        changes.append(f"mount {name} moved to {after} with live leases")

    def configured_mounts(self) -> frozenset[str]:
        """The mounts this replica has, healthy or not."""
        return frozenset(self.mounts)

    def served_mounts(self) -> frozenset[str]:
        """The mounts this replica serves now: configured and healthy.

        Its sweeper claims only their due leases, and stale pending rows are rolled
        back only on them: a call to an unhealthy backend could only fail (an
        attempt used up for nothing) or, against a hung one, hold a worker (or
        start-up) for backend_timeout. Their leases wait in the store, due, until
        the mount is healthy again (or a replica where it is takes them).
        """
        return frozenset(name for name, runtime in self.mounts.items() if runtime.healthy)

    def mount(self, name: str) -> MountRuntime:
        runtime = self.mounts.get(name)
        if runtime is None:
            raise NotFound(f"no mount named {name!r}")
        return runtime

    def role(self, mount: str, role: str) -> RoleSpec:
        spec = self.mount(mount).spec.roles.get(role)
        if spec is None:
            raise NotFound(f"no role {role!r} on mount {mount!r}")
        return spec


async def _connect_within(runtimes: list[MountRuntime], wait: float, when: str) -> None:
    """Connect ``runtimes`` concurrently, waiting at most ``wait`` seconds for each.

    One still connecting then is left to its attempt (the health job and requests
    share it) and says so in its error, which its 503s and the health page show.
    """

    async def connect(runtime: MountRuntime) -> None:
        try:
            async with asyncio.timeout(wait):
                await runtime.ensure_initialized()  # the attempt is shielded: it goes on
        except TimeoutError:
            if not runtime.connecting:  # it ended meanwhile, healthy or with its own reason
                return
            runtime.error = (f"connecting: no answer within {wait:g}s at {when}; still "
                             f"trying in the background (up to backend_timeout, "
                             f"{runtime.timeout:g}s)")
            log.info("mount %s: no answer within %gs at %s; going on without it while it "
                     "connects in the background (503 for it until then)", runtime.name,
                     wait, when)

    await asyncio.gather(*(connect(m) for m in runtimes))


async def _verify_quietly(candidate: MountRuntime) -> str | None:
    """Connect and verify a mount built with a password file's new content; None when
    it works, else why not (redacted).

    Not ``ensure_initialized``: its "mount X unhealthy" warning would be about a mount
    that is not running, while the running one is fine (a false alarm, day-2 QA).
    """
    try:
        await candidate._call("initialize", candidate.backend.initialize, ())
        await candidate._call("verify", candidate.backend.verify, ())
    except BackendError as exc:  # the wrapper redacted it, the candidate secret included
        candidate.error = str(exc)
        return str(exc)
    candidate.healthy, candidate.error = True, None
    return None


def _server(spec: MountSpec) -> str:
    """Which server a mount's ``connection_url`` names: host, port and path, never its
    user or password (those change with a rotation, the server does not)."""
    url = spec.options.get("connection_url")
    if not isinstance(url, str):
        return ""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or ''}:{parts.port or ''}{parts.path}"
    except ValueError:
        return ""
