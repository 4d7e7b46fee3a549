"""``broker lease ...``: look up, renew, list and revoke leases, with progress for bulk revokes."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from broker.cli.common import (
    _POLL_INTERVAL,
    _STALL_POLLS,
    _SYNC_TIMEOUT,
    OperationError,
    UsageError,
    _cell,
    _client,
    _columns,
    _need,
    _output_format,
    _print_json,
    _show_warnings,
    _warn,
    format_table,
)
from broker.client import Client, ClientError

# --------------------------------------------------------------------------- commands: leases


def _print_record(
    args: argparse.Namespace, resp: dict[str, Any], rows: Iterable[tuple[str, Any]]
) -> None:
    if _output_format(args) == "json":
        _print_json(resp)
    else:
        sys.stdout.write(format_table(rows))


def cmd_lease_lookup(args: argparse.Namespace) -> int:
    client = _client(args)
    resp = _need(
        client.request("PUT", "sys/leases/lookup", json={"lease_id": args.lease_id}), "lookup"
    )
    _print_record(args, resp, (resp.get("data") or {}).items())
    return 0


def cmd_lease_renew(args: argparse.Namespace) -> int:
    client = _client(args)
    body: dict[str, Any] = {"lease_id": args.lease_id}
    if args.increment is not None:
        body["increment"] = args.increment
    resp = _need(client.request("PUT", "sys/leases/renew", json=body), "renew")
    _show_warnings(resp)
    rows = [(k, resp.get(k)) for k in ("lease_id", "lease_duration", "renewable")]
    _print_record(args, resp, rows)
    return 0


def cmd_lease_revoke(args: argparse.Namespace) -> int:
    if args.meta:
        if args.lease_id:
            raise UsageError("give a LEASE_ID or --meta KEY=VALUE, not both")
        return _revoke_by_meta(_client(args), args)
    if args.prefix is not None:
        if args.lease_id:
            raise UsageError("give a LEASE_ID or --prefix PREFIX, not both")
        return _revoke_prefix(
            _client(args), args.prefix, force=args.force, sync=args.sync, wait=not args.no_wait
        )
    if not args.lease_id:
        raise UsageError("give the LEASE_ID to revoke (or --prefix PREFIX)")
    for flag, given in (
        ("--force", args.force),
        ("--sync", args.sync),
        ("--no-wait", args.no_wait),
    ):
        if given:
            raise UsageError(f"{flag} only applies with --prefix or --meta")
    # strict: an unknown or dead lease is an error here, where Vault clients get 204.
    resp = _client(args).request("PUT", "sys/leases/revoke",
                                 json={"lease_id": args.lease_id, "strict": True})
    if resp and (resp.get("data") or {}).get("queued"):
        # 202 (sync=true): the first attempt failed or did not end within 30 s; the
        # broker goes on (retried with backoff, then irrevocable).
        _show_warnings(resp)
        sys.stdout.write(f"queued {args.lease_id} (not revoked yet; the broker retries)\n")
        return 1
    sys.stdout.write(f"revoked {args.lease_id}\n")
    return 0


#: the start of the warning a listing answer carries when it stopped at its limit
#: (then ``after=`` its last key asks for the next page).
_STOPPED_AT_LIMIT = "listing stopped at limit="


def _list(client: Client, prefix: str) -> list[str]:
    """Every key one level below ``prefix``, page by page; [] for an empty listing."""
    path = f"sys/leases/lookup/{prefix}"
    keys: list[str] = []
    after = ""
    while True:
        # GET ?list=true rather than the LIST verb: same answer, and it passes
        # proxies and HTTP parsers that only accept the standard methods.
        params = {"list": True, "after": after or None}
        try:
            resp = client.request("GET", path, params=params)
        except ClientError as exc:
            # Only Vault's empty listing (404, {"errors": []}) is "no leases": any
            # other 404 (a wrong address, a proxy's path prefix) is an error.
            if exc.status == 404 and exc.bare:
                return keys
            raise
        page = [str(k) for k in ((resp or {}).get("data") or {}).get("keys") or []]
        keys += page
        stopped = any(str(w).startswith(_STOPPED_AT_LIMIT)
                      for w in (resp or {}).get("warnings") or [])
        if not (stopped and page):
            return keys
        after = page[-1]


def _walk(client: Client, prefix: str) -> Iterable[str]:
    for key in _list(client, prefix):
        if key.endswith("/"):
            yield from _walk(client, prefix + key)
        else:
            yield prefix + key


def _search(client: Client, params: Mapping[str, str]) -> Iterable[dict[str, Any]]:
    after = ""
    while True:
        resp = client.request("GET", "sys/leases/search", params={**params, "after": after or None})
        data = (resp or {}).get("data") or {}
        yield from data.get("leases") or []
        after = data.get("next_after") or ""
        if not after:
            return


def _list_by_meta(client: Client, args: argparse.Namespace) -> int:
    _, params, _ = _meta_selector(args.meta, args.prefix)
    if not args.all:
        params["state"] = "active,revoking,irrevocable"
    rows = list(_search(client, params))
    if args.format == "json":
        _print_json(rows)
    elif args.format == "table":
        if rows:
            cells = [[str(r.get(k) or "-") for k in ("lease_id", "state", "expire_time")]
                     + [_cell("metadata", r.get("metadata"))] for r in rows]
            sys.stdout.write(_columns(["LEASE_ID", "STATE", "EXPIRE_TIME", "METADATA"], cells))
    else:
        sys.stdout.writelines(f"{r.get('lease_id')}\n" for r in rows)
    return 0


def cmd_lease_list(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.meta:
        return _list_by_meta(client, args)
    if args.format or args.all:
        raise UsageError("--format and --all only apply with --meta")
    if not args.prefix:
        raise UsageError("give the PREFIX to list (or --meta KEY=VALUE)")
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    keys = iter(_walk(client, prefix) if args.recursive else _list(client, prefix))
    first = next(keys, None)
    if first is None:
        _check_mount(client, prefix)
        return 0
    sys.stdout.write(first + "\n")
    for key in keys:
        sys.stdout.write(key + "\n")
    return 0


def _check_mount(client: Client, prefix: str) -> None:
    """After an empty listing: UsageError (exit 2) if ``prefix``'s mount is not on the broker.

    The server answers a listing under an unknown mount as an empty one (Vault's
    404 ``{"errors": []}``), and so does Vault, whose CLI then says "No value
    found at ..." and exits 2. A mount that has no leases lists nothing, exit 0.
    Without ``read`` on ``sys/mounts`` there is no telling: nothing is said (the
    answer then lists only the mounts the token may use, and says so in
    ``warnings``; a broker before that answered 403).
    """
    try:
        resp = client.request("GET", "sys/mounts")
    except ClientError as exc:
        if exc.status in {403, 404, 405}:
            return
        raise
    if (resp or {}).get("warnings"):
        return
    mount = prefix.split("/", 1)[0]
    if f"{mount}/" not in ((resp or {}).get("data") or {}):
        raise UsageError(f"no value found at sys/leases/lookup/{prefix}: no mount named "
                         f"{mount!r} (see GET /v1/sys/mounts)")


def cmd_lease_irrevocable(args: argparse.Namespace) -> int:
    client = _client(args)
    params = {"prefix": args.prefix or None, "limit": args.limit}
    resp = _need(client.request("GET", "sys/leases/irrevocable", params=params), "irrevocable")
    leases = (resp.get("data") or {}).get("leases") or []
    if _output_format(args) == "json":
        _print_json(resp)
        return 0
    if not leases:
        sys.stderr.write("no irrevocable leases\n")
        return 0
    rows = [
        [
            str(x.get("lease_id", "")),
            str(x.get("revoke_attempts", "")),
            str(x.get("expire_time", "")),
            " ".join(str(x.get("last_error") or "-").split()),
        ]
        for x in leases
    ]
    sys.stdout.write(_columns(["LEASE_ID", "ATTEMPTS", "EXPIRE_TIME", "LAST_ERROR"], rows))
    return 0


# --------------------------------------------------------------------------- revoke by prefix


@dataclass(frozen=True)
class _Stats:
    active: int = 0
    revoking: int = 0
    revoked: int = 0
    expired: int = 0
    irrevocable: int = 0

    @classmethod
    def from_answer(cls, resp: Mapping[str, Any] | None) -> _Stats:
        data = (resp or {}).get("data") or {}
        return cls(**{k: int(data.get(k) or 0) for k in cls.__dataclass_fields__})


def _stats(client: Client, params: Mapping[str, str]) -> _Stats:
    return _Stats.from_answer(client.request("GET", "sys/leases/stats", params=params))


class _Progress:
    """``[#####.....] 512/1000`` redrawn in place on a TTY; a line now and then otherwise."""

    WIDTH = 30
    LINE_EVERY = 2.0

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.shown: int | None = None
        self.last_line = 0.0

    def update(self, done: int) -> None:
        if self.tty:
            filled = self.WIDTH * done // self.total if self.total else self.WIDTH
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] {done}/{self.total}")
            self.stream.flush()
        elif (
            done != self.shown
            and done < self.total  # the summary line says it when all are done
            and time.monotonic() - self.last_line >= self.LINE_EVERY
        ):
            self.stream.write(f"revoking: {done}/{self.total}\n")
            self.stream.flush()
            self.last_line = time.monotonic()
        self.shown = done

    def close(self) -> None:
        if self.tty and self.shown is not None:
            self.stream.write("\n")
            self.stream.flush()


def _revoke_prefix(
    client: Client,
    prefix: str,
    *,
    force: bool,
    sync: bool,
    wait: bool,
    poll: float = _POLL_INTERVAL,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    kind = "revoke-force" if force else "revoke-prefix"
    return _revoke_selected(
        client, f"sys/leases/{kind}/{prefix}", {"sync": sync}, {"prefix": prefix},
        where=f"under {prefix}", hint=prefix, sync=sync, wait=wait, poll=poll, sleep=sleep,
    )


def _meta_selector(meta: Sequence[tuple[str, str]], prefix: str | None) -> tuple[
        dict[str, str], dict[str, str], str]:
    """(metadata, query params for stats/search, words for messages) of ``--meta`` flags."""
    selected: dict[str, str] = {}
    for key, value in meta:
        if selected.get(key, value) != value:
            raise UsageError(f"--meta {key}= given twice with different values")
        selected[key] = value
    params = {f"meta.{k}": v for k, v in selected.items()} | ({"prefix": prefix} if prefix else {})
    where = "matching " + " ".join(f"{k}={v}" for k, v in selected.items())
    return selected, params, where + (f" under {prefix}" if prefix else "")


def _revoke_by_meta(client: Client, args: argparse.Namespace) -> int:
    meta, params, where = _meta_selector(args.meta, args.prefix)
    body: dict[str, Any] = {"metadata": meta, "sync": args.sync, "force": args.force}
    if args.prefix:
        body["prefix"] = args.prefix
    return _revoke_selected(client, "sys/leases/revoke-by", body, params, where=where,
                            hint=args.prefix or "", sync=args.sync, wait=not args.no_wait)


def _revoke_selected(
    client: Client,
    path: str,
    body: Mapping[str, Any],
    stats_params: Mapping[str, str],
    *,
    where: str,
    hint: str,
    sync: bool,
    wait: bool,
    poll: float = _POLL_INTERVAL,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Queue a revocation of many leases; show progress from stats with the same selector."""
    before: _Stats | None = None
    if wait:
        try:
            before = _stats(client, stats_params)
        except ClientError as exc:
            if exc.status not in {403, 404, 405}:
                raise
            _warn(f"cannot read sys/leases/stats ({exc}); not waiting for the revocations")
    started = time.monotonic()
    resp = client.request("PUT", path, json=body, timeout=_SYNC_TIMEOUT if sync else None)
    _show_warnings(resp)
    data = (resp or {}).get("data") or {}
    queued = int(data.get("queued") or 0)
    # Leases under the selector that were being revoked already when the call came: not
    # queued again, but still to end, so part of the total (and of the progress).
    already = int(data.get("already_revoking") or 0)
    if before is None:
        state = "revoked or irrevocable" if sync else "queued for revocation"
        more = f" ({already} more already being revoked)" if already else ""
        sys.stdout.write(f"{queued} lease(s) {where} {state}{more}\n")
        return 0
    total = queued + already
    progress = None if sync else _Progress(total, sys.stderr)
    previous: _Stats | None = None
    still = revoked = irrevocable = 0
    try:
        while True:
            now = _stats(client, stats_params)
            revoked = max(0, now.revoked - before.revoked)
            # Not the change since `before`: leases already irrevocable were queued
            # again, and if they fail again the count does not move, yet they are
            # still not revoked. The absolute number under the selector is the
            # answer to "is anything left?".
            irrevocable = now.irrevocable
            done = min(total, revoked + irrevocable + max(0, now.expired - before.expired))
            if progress is not None:
                progress.update(done)
            still = still + 1 if now == previous else 0
            # Done when nothing is in flight and every lease of the total has ended;
            # or when nothing is in flight and nothing moves (counts can differ from
            # `total` when tombstones are purged or other leases expire meanwhile).
            if sync or (now.revoking == 0 and (done >= total or still >= _STALL_POLLS)):
                break
            previous = now
            sleep(poll)
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        sys.stderr.write(f"broker: stopped waiting; the server keeps revoking {where}\n")
        return 130
    if progress is not None:
        progress.close()
    elapsed = time.monotonic() - started
    sys.stdout.write(f"revoked {revoked}, irrevocable {irrevocable}, in {elapsed:.1f} s\n")
    if irrevocable:
        raise OperationError(
            f"{irrevocable} lease(s) could not be revoked; see 'broker lease irrevocable {hint}'"
        )
    return 0
