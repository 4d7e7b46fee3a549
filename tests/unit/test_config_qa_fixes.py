"""Config loading fixes from a QA pass: each case was accepted, or a traceback, before."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from broker.config import ConfigError, load_config, read_secret_file
from broker.policy import PolicySet

HEAD = """
[storage]
url = "sqlite:///broker.db"
[audit]
path = "audit.jsonl"
hmac_key_file = "audit.key"
"""

PG = """
[mounts.pg]
plugin = "postgres"
connection_url = "postgresql://admin@127.0.0.1:5432/app"
"""


def error_of(tmp_path: Path, body: str) -> str:
    """The one-line ConfigError of ``HEAD + body``, checked to start with the file."""
    path = tmp_path / "broker.toml"
    path.write_text(HEAD + body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- password_file


def test_a_password_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 name the key and the byte, never a UnicodeDecodeError."""
    (tmp_path / "admin.pw").write_bytes(b"\xff\xfesecret\n")
    message = error_of(tmp_path, PG + 'password_file = "admin.pw"\n')
    assert f"mounts.pg.password_file: cannot read {tmp_path / 'admin.pw'}: " \
           "not UTF-8 text (byte 0)" in message
    assert "secret" not in message


def test_read_secret_file_raises_oserror_for_non_utf8(tmp_path: Path) -> None:
    """Every caller handles OSError: a file that is not UTF-8 is one (EILSEQ), without its bytes."""
    pw = tmp_path / "admin.pw"
    pw.write_bytes(b"ok\xc3(\n")
    with pytest.raises(OSError) as info:
        read_secret_file(str(pw))
    assert info.value.errno == errno.EILSEQ
    assert info.value.strerror == "not UTF-8 text (byte 2)"
    assert info.value.__cause__ is None and info.value.__suppress_context__
    pw.write_text("sécret\r\n")
    assert read_secret_file(str(pw)) == "sécret"


@pytest.mark.parametrize("key", ["password_file", "password_env"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_password_key_is_a_config_error(tmp_path: Path, key: str, value: str) -> None:
    """An empty password_file/password_env was ignored: the mount loaded with no secret."""
    message = error_of(tmp_path, PG + f'{key} = "{value}"\n')
    assert f"mounts.pg.{key}: is empty" in message


# --------------------------------------------------------------------------- [auth.*]


def test_an_unknown_auth_section_is_a_config_error(tmp_path: Path) -> None:
    """``[auth.bogus]`` names its key and the known types."""
    message = error_of(tmp_path, "[auth.bogus]\nx = 1\n")
    assert message.endswith("auth.bogus: unknown auth method type (known: jwt)"), message


def test_a_misspelt_auth_type_is_a_config_error_with_a_hint(tmp_path: Path) -> None:
    """``[auth.jtw.github]`` silently disabled the login; now it is refused, naming jwt."""
    message = error_of(tmp_path, '[auth.jtw.github]\njwks_url = "https://x.example/jwks"\n')
    assert "auth.jtw: unknown auth method type (did you mean auth.jwt?)" in message


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a b?c", "a%2Fb", ".", "..", "é", "a#b", ""])
def test_a_mount_name_that_is_not_a_clean_path_segment_is_refused(tmp_path: Path,
                                                                  name: str) -> None:
    """Mount names are URL path segments: letters, digits, '-', '_', '.' only."""
    quoted = name.replace('"', '\\"')
    message = error_of(tmp_path, PG.replace("[mounts.pg]", f'[mounts."{quoted}"]'))
    assert "mount name must be one URL path segment" in message
    assert f'mounts."{name}": ' in message  # quoted as TOML quotes it


@pytest.mark.parametrize("name", ["a b", "x/y", "..", "r?x"])
def test_a_role_name_that_is_not_a_clean_path_segment_is_refused(tmp_path: Path,
                                                                 name: str) -> None:
    """Role names follow the same rule, naming the role's key."""
    message = error_of(tmp_path, PG + f'[mounts.pg.roles."{name}"]\n')
    assert f'mounts.pg.roles."{name}": role name must be one URL path segment' in message


def test_names_in_use_still_load(tmp_path: Path) -> None:
    """Letters, digits, '-', '_' and '.' (as the examples and tests use them) load."""
    path = tmp_path / "broker.toml"
    path.write_text(HEAD + """
[mounts.pg-2_x]
plugin = "postgres"
connection_url = "postgresql://admin@127.0.0.1:5432/app"
[mounts.pg-2_x.roles.read-only_v1]
[mounts."db.v2"]
plugin = "postgres"
connection_url = "postgresql://admin@127.0.0.1:5432/app"
[mounts."db.v2".roles."ro.1"]
""")
    config = load_config(path)
    assert set(config.mounts) == {"pg-2_x", "db.v2"}
    assert set(config.mounts["db.v2"].roles) == {"ro.1"}


@pytest.mark.parametrize("name", ["sys", "auth"])
def test_built_in_paths_stay_refused(tmp_path: Path, name: str) -> None:
    """sys and auth are still not mount names."""
    message = error_of(tmp_path, PG.replace("[mounts.pg]", f"[mounts.{name}]"))
    assert f"mounts.{name}: sys and auth are built-in paths" in message


# --------------------------------------------------------------------------- storage.url


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite:///?command_timeout=5", "sqlite:////",
                                 "sqlite:///data/", "sqlite:///."])
def test_a_sqlite_url_naming_a_directory_is_a_config_error(tmp_path: Path, url: str) -> None:
    """``sqlite:///`` became the config's directory and the start failed with IsADirectoryError."""
    path = tmp_path / "broker.toml"
    path.write_text(HEAD.replace('"sqlite:///broker.db"', f'"{url}"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: storage.url: names a directory"), info.value


# --------------------------------------------------------------------------- policies


def test_a_configured_default_policy_extends_the_built_in_one(tmp_path: Path) -> None:
    """``[policies.default]`` adds its paths; tokens can still look up, renew, revoke themselves."""
    path = tmp_path / "broker.toml"
    path.write_text(HEAD + """
[policies.default]
"pg/creds/ro" = ["read"]
"sys/leases/lookup" = ["update", "list"]
""")
    policies = PolicySet(load_config(path).policies)
    assert policies.capabilities([], "pg/creds/ro") == {"read"}
    assert policies.capabilities([], "sys/leases/lookup") == {"update", "list"}
    assert policies.capabilities([], "auth/token/lookup-self") == {"read"}
    for own in ("auth/token/renew-self", "auth/token/revoke-self", "sys/leases/renew"):
        assert policies.capabilities([], own) == {"update"}, own


# --------------------------------------------------------------------------- restart-only


def test_restart_only_holds_what_a_reload_does_not_apply(tmp_path: Path) -> None:
    """The settings a SIGHUP keeps are recorded as the file gave them, by dotted key."""
    path = tmp_path / "broker.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:18201"\nworkers = 2\n' + HEAD
                    + "[leases]\nsweeper_batch = 7\n")
    config = load_config(path)
    assert config.restart_only["server.listen"] == ("127.0.0.1", 18201)
    assert config.restart_only["server.workers"] == 2
    assert config.restart_only["storage.url"] == config.storage.url
    assert config.restart_only["audit.path"] == str(tmp_path / "audit.jsonl")
    assert config.restart_only["leases.sweeper_batch"] == 7
    assert not any(key.startswith(("mounts", "policies", "auth", "tokens"))
                   for key in config.restart_only)
