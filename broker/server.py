"""Run the daemon: wire the parts, serve HTTP, handle signals, shut down gracefully.

Start-up order matters for crash safety: the store opens first, interrupted
issues from a previous run are rolled back before any new one is taken, then
the sweeper starts (overdue leases are revoked right away), then the listener.
A mount whose backend is down or does not answer within ``mounts.CONNECT_WAIT``
does not hold start-up: it starts unhealthy (503 for it, with the reason),
connects in the background, and its interrupted issues are rolled back (its
overdue leases revoked) once it is healthy, by the stale-pending job and the
sweeper.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from broker import __version__, instance_lock
from broker.api import create_app
from broker.api.audit_limit import close_limiter
from broker.api.login import close_auth_methods, reload_auth_methods
from broker.audit import AuditError, AuditLog, event
from broker.config import (
    Config,
    ConfigError,
    dev_config_path,
    is_loopback,
    load_config,
    parse_listen,
    tls_pair_problem,
)
from broker.engine import LeaseEngine
from broker.errors import BrokerError, StoreUnavailable
from broker.event_loop import loop_factory
from broker.event_loop import resolve as resolve_event_loop
from broker.file_modes import check_file_modes, secret_files
from broker.instance_lock import InstanceLocked
from broker.lease import TokenState
from broker.policy import PolicySet
from broker.state import BrokerState
from broker.store import LeaseStore, open_store, redact_url
from broker.sweeper import Sweeper
from broker.tokens import TokenManager, hash_token
from broker.worker_stats import StatsBoard
from broker.workers import REUSE_PORT, listen_socket, supervise, worker_audit_path

__all__ = ["InitError", "build_state", "check_server_config", "dev_data_dir",
           "load_server_config", "operator_init", "revoke_dev_roots", "run_server"]

log = logging.getLogger("broker")

#: Accessor of the root token created by ``broker operator init``: a fixed
#: name makes "already initialised" a primary-key lookup.
INIT_ROOT_ACCESSOR = "root-init"
DEV_ROOT_NAME = "dev-root"


def dev_data_dir() -> Path:
    """Where ``--dev`` keeps its store, audit log and key between runs."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "broker" / "dev"


def load_server_config(config_path: str | None, *, dev: bool, listen: str | None) -> Config:
    """The config to run with; ``--dev`` uses the embedded dev config and a private data dir."""
    if dev and config_path is None:
        config = load_config(dev_config_path())
        data = dev_data_dir()
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = dataclasses.replace(
            config,
            storage=dataclasses.replace(config.storage, url=f"sqlite:///{data / 'broker.db'}"),
            audit=dataclasses.replace(config.audit, path=str(data / "audit.jsonl"),
                                      hmac_key_file=str(data / "audit.key")),
        )
    elif config_path is None:
        raise ConfigError("broker", "", "pass --config FILE, or --dev for a local dev server")
    else:
        config = load_config(config_path)
    if listen:
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            raise ConfigError("--listen", "", str(exc)) from None
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, host=host, port=port))
    server = config.server
    if dev and not is_loopback(server.host):
        raise ConfigError("--listen", "", "--dev only listens on a loopback address")
    if dev and server.workers > 1:
        raise ConfigError(config.source, "server.workers", "--dev runs one worker")
    if server.workers > 1 and not hasattr(os, "fork"):
        raise ConfigError(config.source, "server.workers",
                          "more than one worker needs fork(), which this platform lacks")
    if not server.tls and not is_loopback(server.host):
        raise ConfigError(config.source, "server.listen",
                          f"{server.host} is not loopback: TLS (tls_cert_file/tls_key_file) "
                          "is required")
    return config


async def _open_store(config: Config) -> LeaseStore:
    """The configured store, open; StoreUnavailable (one line) if it cannot be."""
    store = open_store(config.storage.url)
    try:
        await store.open()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Said once, with the store's address (no password): "Connection refused"
        # alone left the operator to guess what refused.
        raise StoreUnavailable(f"lease store {redact_url(config.storage.url)}: "
                               f"{type(exc).__name__}: {exc}") from None
    return store


async def build_state(config: Config, *, dev: bool = False) -> BrokerState:
    """Open store and audit log and build the engine; the caller starts and stops it."""
    store = await _open_store(config)
    try:
        audit = await AuditLog.open(config.audit.path, config.audit.hmac_key_file,
                                    fsync=config.audit.fsync, create_key=True,
                                    hmac_accessor=config.audit.hmac_accessor)
    except Exception:
        await store.close()
        raise
    engine = LeaseEngine(store, audit, config)
    sweeper = Sweeper(store, engine.revoke_claimed, config.leases, node_id=engine.node_id,
                      clock=engine.clock, revoke_many=engine.revoke_claimed_many,
                      batch_size=engine.revoke_batch_size, mounts=engine.configured_mounts,
                      ready=engine.served_mounts)
    engine.wake = sweeper.wake
    engine.adopt = sweeper.adopt
    # Another replica issued or queued something due sooner: wake our sweeper too.
    store.add_wake_listener(sweeper.wake)
    return BrokerState(
        config=config,
        store=store,
        audit=audit,
        engine=engine,
        sweeper=sweeper,
        tokens=TokenManager(store, engine.clock),
        policies=PolicySet(config.policies),
        dev=dev,
    )


def _single_node(state: BrokerState) -> bool:
    # With an embedded store and one worker no other process can have an issue
    # in flight, so every pending row found at start-up is from a crash: roll
    # back at once. Another worker's pending rows are its issues in flight.
    return (type(state.store).__name__.startswith("SQLite")
            and state.config.server.workers == 1)


async def start(state: BrokerState) -> None:
    await state.engine.start_mounts()
    await state.engine.rollback_stale_pending(
        older_than=0 if _single_node(state) else None)
    state.sweeper.start()


async def stop(state: BrokerState, grace: float) -> None:
    state.serving = False
    state.engine.accepting = False
    if not await state.engine.wait_issues_idle(grace):
        log.warning("issues still in flight after %ss; their pending rows will be rolled back",
                    grace)
    await state.sweeper.stop(grace)
    await close_auth_methods(state)
    await state.engine.close()
    await close_limiter(state)  # held-back failure lines: their summary, now
    await state.audit.close()
    await state.store.close()


async def revoke_dev_roots(state: BrokerState, reuse_id: str | None = None
                           ) -> tuple[int, int]:
    """``--dev`` start: revoke the root tokens earlier dev runs printed, as
    ``auth/token/revoke`` would: with every child token and every lease they
    own (queued for the sweeper). Returns (tokens revoked, leases queued).

    The dev store is kept between runs on purpose (leases issued by an earlier
    run are still tracked, and revoked when due); its root token is not: it
    was printed once, for that run. Its row stays, revoked, as any revoked
    token's does until the tombstone purge: a client still sending it is
    audited as ``reuse_attempt`` (it was ``auth_failure``: an unknown token).
    Only when this run chooses the same value again (``reuse_id``, the
    ``--dev-root-token-id``) are the old dev root rows deleted, so that the id
    is free: that value is the new root token anyway.
    """
    from broker.api.tokens import revoke_token_tree  # the API's own revoke (no cycle at import)

    now = state.engine.clock()
    olds: list[str] = []
    after = ""
    while batch := await state.store.live_token_accessors(now=now, limit=500, after=after):
        after = batch[-1]
        for accessor in batch:
            record = await state.store.token_by_accessor(accessor)
            if record is not None and record.display_name == DEV_ROOT_NAME:
                olds.append(accessor)
    tokens = leases = 0
    for accessor in olds:
        ended, queued = await revoke_token_tree(state, accessor)
        await state.audit.write(event("token_revoke", action="dev_restart", target=accessor,
                                      tokens=ended, leases_queued=queued))
        tokens, leases = tokens + ended, leases + queued
    if reuse_id is not None:
        taken = await state.store.token_by_hash(hash_token(reuse_id))
        if taken is not None and taken.display_name == DEV_ROOT_NAME:
            await state.store.delete_tokens_by_display_name(DEV_ROOT_NAME)
    if olds:
        log.info("dev: revoked the previous run's root token with its child tokens (%d "
                 "token(s)); %d lease(s) they owned queued for revocation", tokens, leases)
    return tokens, leases


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.server.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.server.tls_cert_file or "", config.server.tls_key_file or "")
    return ctx


def _reload_tls(ctx: ssl.SSLContext, config: Config) -> bool:
    """Load the certificate and key at the configured paths into the live context.

    New connections get the new certificate; open ones keep theirs. The pair is
    first loaded into a scratch context, so a half-written file or a key that
    does not match leaves the running certificate in place (logged, not fatal).
    The paths themselves, like the listen address, change only with a restart.
    """
    cert, key = config.server.tls_cert_file or "", config.server.tls_key_file or ""
    # The same check as at start: names the file at fault and OpenSSL's reason,
    # never the files' content (the message is logged).
    problem = tls_pair_problem(cert, key)
    if problem is None:
        try:
            ctx.load_cert_chain(cert, key, password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:  # replaced again since the check
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                getattr(exc, "reason", None) or type(exc).__name__
            problem = ("tls_cert_file", f"{cert} / {key} changed while being loaded ({reason})")
    if problem is not None:
        log.error("reload: TLS certificate %s not reloaded, keeping the running one: "
                  "server.%s: %s", cert, *problem)
        return False
    log.info("reload: TLS certificate reloaded from %s", cert)
    return True


def _banner(state: BrokerState, root_token: str | None) -> str:
    addr = state.config.server.address
    lines = [
        f"==> broker {__version__} server started{' in DEV mode' if state.dev else ''}.",
        f"    Address:  {addr}",
        f"    Storage:  {redact_url(state.config.storage.url)}",
        f"    Audit:    {state.config.audit.path}",
    ]
    for name, m in state.engine.mounts.items():
        health = "healthy" if m.healthy else f"UNHEALTHY: {m.error}"
        lines.append(f"    Mount:    {name}/ ({m.spec.plugin}, roles: "
                     f"{', '.join(sorted(m.spec.roles)) or 'none'}) {health}")
    if root_token:
        example = next(
            (f"{n}/{r}" for n, m in state.engine.mounts.items() for r in sorted(m.spec.roles)),
            "MOUNT/ROLE")
        lines += [
            "",
            # Where the data is: the Storage and Audit lines above (--config may move
            # it out of dev_data_dir()).
            "WARNING! dev mode: loopback only, and a root token printed below.",
            "Do not run it in production.",
            "",
            "You may need to set the following environment variables:",
            "",
            f"    export BROKER_ADDR='{addr}'",
            f"    export BROKER_TOKEN='{root_token}'",
            "",
            f"Root Token: {root_token}",
            "",
            "Try it:",
            f"    broker creds {example}",
            "",
        ]
    return "\n".join(lines)


async def _serve(config: Config, *, dev: bool, dev_root_token_id: str | None,
                 sock: socket.socket | None = None, worker: int | None = None,
                 board: StatsBoard | None = None) -> int:
    # the loop actually running, not the one asked for: what an operator debugging wants
    log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
    state = await build_state(config, dev=dev)
    state.worker, state.stats_board = worker, board
    # Once the store and the audit log are open (their -wal/-shm exist now): each worker
    # checks its own audit file, worker 1 the files they share.
    check_file_modes(secret_files(config, shared=worker in (None, 1)))
    root_token: str | None = None
    from broker.jobs import start_jobs

    try:
        await start(state)
        if dev:
            await revoke_dev_roots(state, dev_root_token_id)
            root_token, _ = await state.tokens.create(
                policies=["root"], ttl=None, display_name=DEV_ROOT_NAME,
                token_id=dev_root_token_id)
    except BaseException:
        await stop(state, 0)
        raise
    scheduler = start_jobs(state)
    app = create_app(state)
    in_flight = InFlight()
    app.middlewares.append(in_flight.middleware)
    # keepalive_timeout also closes a connection still sending its first headers
    # (a slowloris client, which aiohttp's one-hour default let hold a socket).
    # shutdown_timeout: what aiohttp waits for once the listener is closed; the
    # in-flight requests had shutdown_grace before that (drain, below).
    runner = web.AppRunner(app, access_log=None,
                           shutdown_timeout=min(config.server.shutdown_grace, CLOSE_WAIT),
                           keepalive_timeout=config.server.idle_timeout)
    await runner.setup()
    tls = _ssl_context(config)
    site: web.BaseSite = (
        web.SockSite(runner, sock, ssl_context=tls) if sock is not None
        else web.TCPSite(runner, config.server.host, config.server.port, ssl_context=tls))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        scheduler.shutdown()
        await stop(state, 0)
        print(f"broker: error: cannot listen on {config.server.host}:{config.server.port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 1
    if worker is None:
        print(_banner(state, root_token), flush=True)
    else:
        log.info("worker %d (pid %d) serving; audit log %s", worker, os.getpid(),
                 config.audit.path)
        if worker == 1:
            print(_banner(state, root_token) + f"\n    Workers:  {config.server.workers}",
                  flush=True)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    reload_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    # The broker starts with SIGHUP held back (run_server; a worker too,
    # broker/workers.py): one that came meanwhile is delivered now, to the
    # handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    async def reloader() -> None:
        while True:
            await reload_requested.wait()
            reload_requested.clear()
            try:
                await reload(state, tls=tls)
            except Exception:  # a bug in a reload must not end every later one
                log.exception("reload failed; a later SIGHUP reloads again")

    reload_task = asyncio.create_task(reloader())
    await stopping.wait()
    log.info("shutting down: no new requests; finishing in-flight work (grace %ss)",
             config.server.shutdown_grace)
    reload_task.cancel()
    state.serving = False
    state.engine.accepting = False
    scheduler.shutdown()
    # Still listening while requests drain: a new client gets 503 "broker is
    # shutting down" (and sys/health 503, for load balancers), not "connection
    # refused". Then the listener closes and the connections with it.
    if not await in_flight.drained(config.server.shutdown_grace):
        log.warning("shutting down: %d request(s) still in flight after %ss; cancelling them",
                    in_flight.count, config.server.shutdown_grace)
    await runner.cleanup()
    await scheduler.finish(CLOSE_WAIT)
    await stop(state, config.server.shutdown_grace)
    return 0


#: Seconds aiohttp waits, once the listener is closed, for responses still being
#: written (the requests themselves had shutdown_grace to finish before).
CLOSE_WAIT = 2.0


class InFlight:
    """Counts the requests a handler is working on (not those answered 503 while
    shutting down: the error middleware answers them before any handler)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        self.count += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until no request is in flight (True), at most ``timeout`` seconds."""
        if not self.count:
            return True  # wait_for(..., 0) would time out even on a set event
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except TimeoutError:
            return False
        return True


def reread_config(running: Config) -> tuple[Config, list[str]]:
    """``running``'s config file read again (ConfigError if it is bad now), and the
    settings changed in it that wait for a restart (dotted keys).

    Listener, workers, store and audit log need a restart: the running ones
    are kept, whatever the file says of them now; so are the ``[leases]``
    settings the sweeper and the jobs read at start (Config.restart_only).
    """
    # The running listener keeps its TLS context; _reload_tls checks a renewed pair
    # itself, so a half-written certificate must not also reject unrelated changes.
    new = load_config(running.source, check_tls=False)
    waiting = [key for key, value in new.restart_only.items()
               if running.restart_only.get(key, value) != value]
    # restart_only stays what runs: a second SIGHUP warns again, a reverted file not.
    return dataclasses.replace(new, storage=running.storage, audit=running.audit,
                               server=running.server,
                               restart_only=running.restart_only), waiting


async def reload(state: BrokerState, *, tls: ssl.SSLContext | None = None) -> bool:
    """SIGHUP: re-read the TLS files and the config; a bad one is rejected and the old one stays.

    The certificate is reloaded whether or not the config is good: a renewed
    certificate must not wait for an unrelated typo to be fixed.
    """
    if tls is not None:
        _reload_tls(tls, state.config)
    source = state.config.source
    try:
        new, waiting = reread_config(state.config)
    except ConfigError as exc:
        log.error("reload rejected, keeping the running config: %s", exc)
        return False
    if waiting and state.worker in (None, 1):  # with workers, said once, not once per worker
        log.warning("reload: changed in %s but only applied by a restart (the running "
                    "values stay): %s", source, ", ".join(waiting))
    mount_changes = await state.engine.reload(new)
    # What the engine runs: a mount whose plugin change it refused keeps its old spec.
    new = dataclasses.replace(new, mounts=state.engine.config.mounts)
    state.policies = PolicySet(new.policies)
    old, state.config = state.config, new
    await reload_auth_methods(state, old)
    try:
        await state.audit.reopen()
    except AuditError as exc:
        log.error("reload: could not reopen the audit log: %s", exc)
    # What a reload opens again: the audit log (a new file after rotation: logrotate's
    # `create` mode) and the TLS key. (password_files: config.py warns as it reads them.)
    check_file_modes([f for f in secret_files(state.config, shared=state.worker in (None, 1))
                      if f.key in {"audit.path", "server.tls_key_file"}], when="reload: ")
    changes = _named_changes("policy", old.policies, new.policies)
    changes += _named_changes("auth method", _auth_methods(old), _auth_methods(new))
    if old.tokens != new.tokens:
        changes.append("[tokens] changed")
    if any(getattr(old.leases, f.name) != getattr(new.leases, f.name)
           for f in dataclasses.fields(new.leases)
           if f"leases.{f.name}" not in new.restart_only):  # those: the warning above
        changes.append("[leases] changed")
    changes += mount_changes
    log.info("config reloaded from %s: %s", source, "; ".join(changes) or "nothing changed")
    return True


def _named_changes(kind: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``policy app added``, ``policy ci changed``, ... for the reload log line."""
    out = [f"{kind} {name} added" for name in new if name not in old]
    out += [f"{kind} {name} changed" for name in new if name in old and old[name] != new[name]]
    out += [f"{kind} {name} removed" for name in old if name not in new]
    return out


def _auth_methods(config: Config) -> dict[str, Any]:
    """``[auth.TYPE.NAME]`` sections by ``TYPE.NAME`` (auth/NAME/login)."""
    return {f"{kind}.{name}": table for kind, methods in config.auth.items()
            if isinstance(methods, Mapping) for name, table in methods.items()}


def _setup_logging() -> None:
    level = os.environ.get("BROKER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    # At DEBUG, botocore logs whole response bodies: CreateAccessKey and
    # AssumeRole answers carry the secret keys the broker is issuing. Those
    # loggers never go below INFO, whatever BROKER_LOG_LEVEL says.
    floor = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(floor)


def check_server_config(config_path: str, *, listen: str | None = None) -> int:
    """``broker server --check``: the checks ``broker server`` makes
    before it opens anything (the config file, and what the server adds: TLS off
    loopback, workers), without starting. Prints ``config ok: FILE`` (0) or the
    one-line error (2), as ``broker server`` does, after the warnings the server
    logs at load (``broker: warning: ...``). Connects to nothing."""
    # The warnings `broker server` logs as it loads this config, said here too
    # (docs/auth.md promises one for a templated policy rule followed by '*').
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CheckFormatter())
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        config = load_server_config(config_path, dev=False, listen=listen)
        try:
            PolicySet(config.policies)  # compiled as at start: warns about risky rules
        except ValueError as exc:  # a policy the server would refuse at start
            raise ConfigError(config.source, "policies", str(exc)) from None
        check_file_modes(secret_files(config, shared=True))
    except ConfigError as exc:
        print(f"broker: error: {exc}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger().removeHandler(handler)
    print(f"config ok: {config_path}")
    return 0


class _CheckFormatter(logging.Formatter):
    """``broker: warning: ...``: a load warning as ``--check`` prints it, one line."""

    def format(self, record: logging.LogRecord) -> str:
        return f"broker: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def run_server(config_path: str | None, *, dev: bool, dev_root_token_id: str | None,
               listen: str | None) -> int:
    """``broker server``: blocks until SIGTERM/SIGINT; returns the exit code."""
    # SIGHUP's default action ends the process, and systemd counts an end by
    # SIGHUP as clean (Restart=on-failure does not restart it). A reload sent
    # while the broker starts (opening the store, connecting the mounts: up to
    # mounts.CONNECT_WAIT for one that does not answer) is held back until
    # _serve's handler is in place, and then carried out.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    _setup_logging()
    try:
        config = load_server_config(config_path, dev=dev, listen=listen)
    except ConfigError as exc:
        print(f"broker: error: {exc}", file=sys.stderr)
        return 2
    # The store's instance lock and the port come first, before anything is
    # opened: a second broker on the same store or port stops here, having
    # touched neither the first one's store nor its audit log.
    try:
        lock = instance_lock.hold(config.storage.url)
    except (InstanceLocked, OSError, ValueError) as exc:
        print(f"broker: error: {exc}", file=sys.stderr)
        return 1
    try:
        if config.server.workers > 1:
            return _run_workers(config)
        return _run_single(config, dev=dev, dev_root_token_id=dev_root_token_id)
    finally:
        if lock is not None:
            os.close(lock)


def _run_single(config: Config, *, dev: bool, dev_root_token_id: str | None) -> int:
    server = config.server
    try:
        sock = listen_socket(server.host, server.port, reuse_port=False)
    except OSError as exc:
        print(f"broker: error: cannot listen on {server.host}:{server.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    try:
        loop = resolve_event_loop(server.event_loop)
        with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
            return runner.run(_serve(config, dev=dev, dev_root_token_id=dev_root_token_id,
                                     sock=sock))
    except _STARTUP_ERRORS as exc:
        print(f"broker: error: {_startup_error(exc)}", file=sys.stderr)
        return 1
    finally:
        sock.close()


#: What a broker that cannot start raises (an unreadable audit key, a store that
#: is down or of a newer schema, a bad event loop choice): one line, no traceback.
_STARTUP_ERRORS = (OSError, ValueError, RuntimeError, BrokerError, asyncpg.PostgresError,
                   asyncpg.InterfaceError)


def _startup_error(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return f"{type(exc).__name__}: {exc}"
    return str(exc)


def _run_workers(config: Config) -> int:
    """``workers > 1``: bind here, then fork the workers (broker/workers.py)."""
    server = config.server
    try:
        held = listen_socket(server.host, server.port, listen=not REUSE_PORT)
    except OSError as exc:
        print(f"broker: error: cannot listen on {server.host}:{server.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    loop = resolve_event_loop(server.event_loop)
    board = StatsBoard(server.workers)  # mapped before the forks: shared with every worker
    current = config  # what a worker started now runs: the last config a SIGHUP read

    def reread() -> None:
        nonlocal current
        try:
            # Worker 1 logs the settings that wait for a restart: not said twice.
            current, _ = reread_config(current)
        except Exception as exc:  # raised in a signal handler, it would end the supervisor
            log.error("supervisor: reload rejected, a restarted worker keeps the running "
                      "config: %s", exc)
            return
        log.info("supervisor: config re-read from %s for workers started from now on",
                 current.source)

    def serve(worker: int) -> int:
        own = dataclasses.replace(current, audit=dataclasses.replace(
            current.audit, path=worker_audit_path(current.audit.path, worker)))
        try:
            sock = held
            if REUSE_PORT:
                held.close()  # the supervisor's placeholder: this worker listens on its own
                sock = listen_socket(server.host, server.port)
            with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
                return runner.run(_serve(own, dev=False, dev_root_token_id=None, sock=sock,
                                         worker=worker, board=board))
        except _STARTUP_ERRORS as exc:
            print(f"broker: error: worker {worker}: {_startup_error(exc)}", file=sys.stderr)
            return 1

    try:
        return supervise(server.workers, serve, reread, heartbeat=board.heartbeat,
                         stall_timeout=server.worker_stall_timeout)
    finally:
        held.close()
        board.close()


#: how the audit log ends its error for a running server (broker/audit.py).
_REFUSED_UNTIL_WRITABLE = "; requests are refused until it is writable"


def _not_a_directory(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` if it is not a directory (a regular
    file where a directory must be), else None."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else str(parent)
    return None


class InitError(Exception):
    """``broker operator init`` refused, or could not open the store or the audit log:
    one line for the operator."""


def operator_init(config_path: str) -> str:
    """Create a root token in the configured store; returns it (shown once).

    Refused while a root token made by an earlier init is still active. Once
    that one is revoked (by itself or another root token), init may run again:
    the break-glass path for a lost root token is to revoke it through the API
    with any other root token, or by hand in the store (docs/operations.md).

    ConfigError for a bad config; InitError when refused or when the store or
    the audit log cannot be opened (the same one-line errors as ``broker server``).
    """
    config = load_config(config_path)
    for what, path in (("audit log", config.audit.path),
                       ("audit HMAC key", config.audit.hmac_key_file)):
        if (blocker := _not_a_directory(path)) is not None:
            # Opening said "cannot open (File exists)": the reason is the path itself.
            raise InitError(f"{what} {path}: {blocker} is not a directory; fix [audit] "
                            f"{'path' if what == 'audit log' else 'hmac_key_file'} "
                            "(no root token was made)")

    async def init() -> str:
        store = await _open_store(config)
        try:
            accessor = INIT_ROOT_ACCESSOR
            for n in range(1, 1000):
                accessor = INIT_ROOT_ACCESSOR if n == 1 else f"{INIT_ROOT_ACCESSOR}-{n}"
                existing = await store.token_by_accessor(accessor)
                if existing is None:
                    break
                if existing.state is TokenState.ACTIVE:
                    raise InitError(
                        f"already initialised: root token {accessor} is active "
                        "(revoke it with a root token to initialise again)")
            else:
                raise InitError(f"no free accessor left: {accessor} exists (not active)")
            # Open the audit log first: no audit, no root token (fail-closed).
            try:
                audit = await AuditLog.open(config.audit.path, config.audit.hmac_key_file,
                                            fsync=config.audit.fsync, create_key=True,
                                            hmac_accessor=config.audit.hmac_accessor)
            except AuditError as exc:
                # Its message is a running server's ("requests are refused until it
                # is writable"): init has no requests, it just makes no token.
                reason = str(exc).removesuffix(_REFUSED_UNTIL_WRITABLE)
                raise InitError(f"{reason} (no root token was made)") from None
            try:
                token, _ = await TokenManager(store).create(
                    policies=["root"], ttl=None, display_name="root", accessor=accessor)
                await audit.write(event("admin", action="operator_init",
                                        created={"accessor": accessor, "client_token": token}))
            finally:
                await audit.close()
            return token
        finally:
            await store.close()

    try:
        return asyncio.run(init())
    except _STARTUP_ERRORS as exc:
        # StoreUnavailable and AuditError (BrokerErrors) included: said as `broker
        # server` says them, in one line.
        raise InitError(_startup_error(exc)) from None
