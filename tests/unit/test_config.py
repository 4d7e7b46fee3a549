"""Config loading: typed values, and one-line errors naming file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, dev_config_path, load_config
from broker.store import open_store, redact_url

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    return message


def test_dev_config_loads() -> None:
    """The embedded dev config is valid."""
    config = load_config(dev_config_path())
    assert "pg" in config.mounts and "readonly" in config.mounts["pg"].roles


def test_example_config_is_true_to_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """config/broker.example.toml loads once its files and env exist."""
    text = (ROOT / "config" / "broker.example.toml").read_text()
    for name in ("tls.crt", "tls.key", "pg-admin"):
        (tmp_path / name).write_text("x\n")
    text = (text.replace("/etc/broker/tls.crt", str(tmp_path / "tls.crt"))
            .replace("/etc/broker/tls.key", str(tmp_path / "tls.key"))
            .replace("/run/secrets/pg-admin", str(tmp_path / "pg-admin")))
    monkeypatch.setenv("MYSQL_ADMIN_PASSWORD", "example")
    config = load_config(write(tmp_path, text))
    assert config.server.tls and config.server.port == 8200
    assert config.mounts["pg"].secret == "x"
    assert set(config.mounts) == {"pg", "my", "aws"}
    assert config.leases.revoke_max_attempts == 6
    assert config.leases.revoke_batch == 32


def test_durations_become_seconds(tmp_path: Path) -> None:
    """Durations in roles and [leases] are parsed to seconds."""
    config = load_config(write(tmp_path, """
[leases]
max_ttl = "7d"
[mounts.pg]
plugin = "postgres"
connection_url = "postgresql://postgres@127.0.0.1/postgres"
[mounts.pg.roles.r]
default_ttl = "90s"
max_ttl = "2h"
"""))
    role = config.mounts["pg"].roles["r"]
    assert (role.default_ttl, role.max_ttl, config.leases.max_ttl) == (90, 7200, 604800)


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ('[server]\nlisten = "0.0.0.0:8200"', "server.listen", "tls_cert_file"),
    ('[server]\nlisten = "nonsense"', "server.listen", "HOST:PORT"),
    ('[server]\nlisten = "127.0.0.1:8200"\nbogus = 1', "server.bogus", "unknown key"),
    ('[nope]\nx = 1', "nope", "unknown section"),
    ('[leases]\ndefault_ttl = "soon"', "leases.default_ttl", "duration"),
    ('[mounts.pg]\nplugin = "oracle"', "mounts.pg.plugin", "unknown plugin"),
    ('[mounts.pg]\nplugin = "postgres"\nconnection_url = "postgresql://u:hunter2@h/db"',
     "mounts.pg.connection_url", "must not contain a password"),
    ('[mounts.pg]\nplugin = "postgres"\npassword = "hunter2"', "mounts.pg.password",
     "inline passwords"),
    ('[mounts.pg]\nplugin = "postgres"\npassword_env = "BROKER_TEST_UNSET_VAR"',
     "mounts.pg.password_env", "is not set"),
    ('[mounts.pg]\nplugin = "postgres"\npassword_file = "/nonexistent/pw"',
     "mounts.pg.password_file", "cannot read"),
    ('[mounts.pg]\nplugin = "postgres"\n[mounts.pg.roles.r]\ndefault_ttl = "2h"\nmax_ttl = "1h"',
     "mounts.pg.roles.r.default_ttl", "longer than max_ttl"),
    ('[mounts.pg]\nplugin = "postgres"\n[mounts.pg.roles.r]\ncreation_statements = ["{{nme}}"]',
     "mounts.pg.roles.r.creation_statements", "nme"),
    ('[server]\nevent_loop = "trio"', "server.event_loop", "auto, uvloop, asyncio"),
    ('[leases]\nrevoke_batch = 0', "leases.revoke_batch", "between 1"),
    ('[leases]\nrevoke_batch = 5000', "leases.revoke_batch", "and 1000"),
    ('[leases]\nrevoke_batch = "32"', "leases.revoke_batch", "expected int"),
    ('[leases]\nrevoke_batch = true', "leases.revoke_batch", "expected int"),
    ('[policies.app]\n"pg/creds/r" = ["raed"]', 'policies.app."pg/creds/r"', "unknown capability"),
    ('[policies.root]\n"x" = ["read"]', "policies.root", "built in"),
])
def test_bad_config_names_file_key_and_problem(tmp_path: Path, text: str, key: str,
                                               fragment: str) -> None:
    """Each mistake is reported as FILE: KEY: problem on one line."""
    message = error_of(tmp_path, text)
    assert f": {key}: " in message, message
    assert fragment in message, message
    assert "hunter2" not in message


def test_revoke_batch_is_read_and_defaults_to_32(tmp_path: Path) -> None:
    """[leases] revoke_batch: 1 turns batching off; unset it is 32."""
    assert load_config(write(tmp_path, "[leases]\nrevoke_batch = 1")).leases.revoke_batch == 1
    assert load_config(write(tmp_path, "[leases]\nrevoke_batch = 1000")
                       ).leases.revoke_batch == 1000
    assert load_config(write(tmp_path, "")).leases.revoke_batch == 32


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the position."""
    assert "invalid TOML" in error_of(tmp_path, "[server\nlisten=")


def test_missing_file(tmp_path: Path) -> None:
    """A missing config file is a clear error."""
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """sqlite and audit paths resolve against the config file's directory."""
    config = load_config(write(tmp_path, '[storage]\nurl = "sqlite:///data/b.db"\n'
                                         '[audit]\npath = "audit.jsonl"\n'))
    assert config.storage.url == f"sqlite:///{tmp_path / 'data/b.db'}"
    assert config.audit.path == str(tmp_path / "audit.jsonl")


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://broker:s3cret@db:5432/broker", "postgresql://broker:***@db:5432/broker"),
    ("postgresql://broker@db/broker", "postgresql://broker@db/broker"),
    ("sqlite:////var/lib/broker/broker.db", "sqlite:////var/lib/broker/broker.db"),
    ("mysql://u:p%40ss@h/x", "mysql://u:***@h/x"),
])
def test_a_storage_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["mysql://broker:s3cret@db/broker",
                                 "postgresql://broker:s3cret@db"])
def test_a_bad_storage_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ValueError) as err:
        open_store(url)
    assert "broker:***@db" in str(err.value) and "s3cret" not in str(err.value)


def test_a_relative_sqlite_store_keeps_its_parameters(tmp_path: Path) -> None:
    """sqlite:///relative.db?... resolves the path against the config's directory only."""
    config = load_config(write(tmp_path, '[storage]\nurl = "sqlite:///data/b.db?command_timeout=3"'))
    assert config.storage.url == f"sqlite:///{tmp_path / 'data' / 'b.db'}?command_timeout=3"
    store = open_store(config.storage.url)
    assert store.command_timeout == 3.0  # type: ignore[attr-defined]
