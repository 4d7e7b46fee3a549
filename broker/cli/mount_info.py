"""Which plugin backs a mount: what ``broker creds --format env`` and ``broker exec`` name
a credential's environment variables after (``PGPASSWORD``, ``AWS_ACCESS_KEY_ID``).

Asked per mount at ``sys/internal/ui/mounts/MOUNT`` (Vault's path), which answers
any token about a mount its policies grant something under. A broker from before
that path answers 404 (or 405): then ``sys/mounts``, once, as such a broker's
default policy granted it. When neither may be read the variables are named
``BROKER_*``, with a warning that says why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.cli.common import remember_env_names
from broker.client import Client, ClientError

__all__ = ["MOUNT_INFO_PATH", "MountPlugins", "mount_plugins"]

#: Vault's per-mount information path; the mount name (or any path under it) follows.
MOUNT_INFO_PATH = "sys/internal/ui/mounts"
#: the answers of a broker (or proxy) that does not know MOUNT_INFO_PATH.
_NOT_SERVED = frozenset({404, 405})
_REFUSED = 403


@dataclass
class MountPlugins:
    """What was learnt about the mounts asked for."""

    #: mount -> plugin type, for each mount whose type could be read.
    plugins: dict[str, str] = field(default_factory=dict)
    #: why some variables will be named BROKER_* (one line each, no "warning:" prefix).
    warnings: list[str] = field(default_factory=list)
    #: the mounts sys/mounts was read for (an older broker) and does not list.
    missing: list[str] = field(default_factory=list)


def mount_plugins(client: Client, mounts: Iterable[str]) -> MountPlugins:
    """The plugin type of each of ``mounts``; the server's ``env_names`` are remembered.

    A 403 for a mount (the token may not use it; or it does not exist, which the
    answer does not tell apart) leaves that mount out with a warning; any other
    error (connection refused, a 5xx) raises ClientError.
    """
    found = MountPlugins()
    wanted = list(dict.fromkeys(mounts))
    for mount in wanted:
        try:
            resp = client.request("GET", f"{MOUNT_INFO_PATH}/{mount}")
        except ClientError as exc:
            if exc.status in _NOT_SERVED:
                return _from_sys_mounts(client, wanted)
            if exc.status != _REFUSED:
                raise
            found.warnings.append(f"cannot read {MOUNT_INFO_PATH}/{mount} ({exc}); "
                                  f"using BROKER_* variable names for {mount}")
            continue
        data = (resp or {}).get("data") or {}
        if isinstance(data, dict) and "type" in data:
            remember_env_names({f"{mount}/": data})
            found.plugins[mount] = str(data["type"])
    return found


def _from_sys_mounts(client: Client, wanted: list[str]) -> MountPlugins:
    """An older broker: every mount from ``sys/mounts`` (if the token may read it)."""
    found = MountPlugins()
    try:
        resp = client.request("GET", "sys/mounts")
    except ClientError as exc:
        if exc.status in {_REFUSED, *_NOT_SERVED}:
            found.warnings.append(f"cannot read sys/mounts ({exc}); "
                                  "using BROKER_* variable names")
            return found
        raise
    data = (resp or {}).get("data") or {}
    remember_env_names(data)
    listed = {str(k).rstrip("/"): str(v.get("type", "")) for k, v in data.items()
              if isinstance(v, dict)}
    found.plugins = {m: listed[m] for m in wanted if m in listed}
    found.missing = [m for m in wanted if m not in listed]
    return found
