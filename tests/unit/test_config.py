"""Config loading: typed values, and one-line errors naming file, key and problem."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def tls_pair(directory: Path, name: str = "tls") -> tuple[Path, Path]:
    """A self-signed PEM certificate and its key, written to ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_dev_config_loads() -> None:
    """The embedded dev config is valid."""
    config = load_config(dev_config_path())
    assert "pg" in config.mounts and "readonly" in config.mounts["pg"].roles


def test_example_config_is_true_to_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """config/broker.example.toml loads once its files and env exist."""
    text = (ROOT / "config" / "broker.example.toml").read_text()
    tls_pair(tmp_path)
    (tmp_path / "pg-admin").write_text("x\n")
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
    ('[mounts.pg]\nplugin = "postgres"\nconnection_url = "postgresql://u@h/db?password=hunter2"',
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
    # asyncpg also takes the password as a query parameter (QA: it was shown in clear).
    ("postgresql://b@db/broker?password=s3cret&sslmode=require",
     "postgresql://b@db/broker?password=***&sslmode=require"),
    ("postgresql://b@db/broker?sslmode=require&PASSWORD=s3cret&sslpassword=k3y",
     "postgresql://b@db/broker?sslmode=require&PASSWORD=***&sslpassword=***"),
    ("postgresql://b:x@db/broker?pass%77ord=s3cret", "postgresql://b:***@db/broker?pass%77ord=***"),
    # No host part: the URL must come back as written, but for the secret.
    ("postgresql:///db?host=/tmp&password=s", "postgresql:///db?host=/tmp&password=***"),
    ("sqlite:////var/lib/b.db?password=x", "sqlite:////var/lib/b.db?password=***"),
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


# --------------------------------------------------------------------------- unreadable files


def test_a_config_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    """A file in another encoding is a ConfigError naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nlisten = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and "not UTF-8" in str(info.value)


def test_a_directory_as_config_names_it(tmp_path: Path) -> None:
    """`--config DIR` is a ConfigError naming the directory, not an IsADirectoryError."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not a config file"


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(("text", "key"), [
    ('[mounts.pg]\nplugin = "postgres"\n'
     'connection_url = "postgresql://postgres:hunter2@[::1/postgres"', "mounts.pg.connection_url"),
    ('[mounts.pg]\nplugin = "postgres"\n'
     'connection_url = "postgresql://postgres@[::1/postgres"', "mounts.pg.connection_url"),
    ('[mounts.my]\nplugin = "mysql"\nconnection_url = "mysql://root:hunter2@[::1/test"',
     "mounts.my.connection_url"),
    ('[storage]\nurl = "postgresql://broker:hunter2@[::1/broker"', "storage.url"),
])
def test_a_malformed_url_is_a_config_error_without_the_url(tmp_path: Path, text: str,
                                                           key: str) -> None:
    """An unclosed IPv6 bracket is "malformed URL" on the key, not a ValueError traceback."""
    message = error_of(tmp_path, text)
    assert f": {key}: malformed URL" in message, message
    assert "hunter2" not in message and "[::1" not in message


@pytest.mark.parametrize("url", ["postgresql://broker@db:99999/broker",
                                 "postgresql://broker:hunter2/broker"])
def test_a_storage_url_with_a_bad_port_is_refused_without_echo(tmp_path: Path, url: str) -> None:
    """A bad port in storage.url (or a password where the port goes) is not echoed."""
    message = error_of(tmp_path, f'[storage]\nurl = "{url}"')
    assert ": storage.url: malformed URL: the port" in message, message
    assert "hunter2" not in message and "99999" not in message


def test_a_storage_url_of_the_wrong_kind_shows_only_its_scheme(tmp_path: Path) -> None:
    """storage.url = mysql://user:PASSWORD@... names the scheme, never the password."""
    message = error_of(tmp_path, '[storage]\nurl = "mysql://broker:hunter2@db/broker"')
    assert message.endswith(
        ": storage.url: expected sqlite:///PATH or postgresql://..., got 'mysql://...'"), message
    assert "hunter2" not in error_of(tmp_path, '[storage]\nurl = "broker:hunter2@db"')


# --------------------------------------------------------------------------- TLS


def _tls_config(tmp_path: Path, cert: Path, key: Path) -> str:
    return f'[server]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'


def test_a_matching_pem_pair_loads(tmp_path: Path) -> None:
    """A real certificate and its key pass the check."""
    cert, key = tls_pair(tmp_path)
    config = load_config(write(tmp_path, _tls_config(tmp_path, cert, key)))
    assert config.server.tls_cert_file == str(cert)


def test_a_certificate_that_is_not_pem_names_tls_cert_file(tmp_path: Path) -> None:
    """A cert file that is not PEM fails at load naming the key, not later as '[SSL] PEM lib'."""
    _, key = tls_pair(tmp_path)
    cert = tmp_path / "cert.der"
    cert.write_bytes(b"\x30\x82 not pem")
    message = error_of(tmp_path, _tls_config(tmp_path, cert, key))
    assert f": server.tls_cert_file: {cert} is not a PEM certificate" in message, message


@pytest.mark.parametrize("what", ["garbage", "another pair's key"])
def test_a_bad_key_names_tls_key_file(tmp_path: Path, what: str) -> None:
    """A key that is not PEM, or belongs to another certificate, fails naming tls_key_file."""
    cert, key = tls_pair(tmp_path)
    if what == "garbage":
        key.write_text("hello\n")
    else:
        _, key = tls_pair(tmp_path, "other")
    message = error_of(tmp_path, _tls_config(tmp_path, cert, key))
    assert f": server.tls_key_file: {key} is not an unencrypted PEM private key" in message
    assert "BEGIN" not in message  # no key material


def test_a_reload_may_skip_the_tls_check(tmp_path: Path) -> None:
    """check_tls=False (SIGHUP): a half-written renewal does not reject the config."""
    cert, key = tls_pair(tmp_path)
    key.write_text("half written")
    config = load_config(write(tmp_path, _tls_config(tmp_path, cert, key)), check_tls=False)
    assert config.server.tls


# --------------------------------------------------------------------------- minimums


_ROLE = '[mounts.pg]\nplugin = "postgres"\n[mounts.pg.roles.r]\n'


@pytest.mark.parametrize(("text", "key", "fragment"), [
    (_ROLE + 'default_ttl = "0s"', "mounts.pg.roles.r.default_ttl", "at least 1s, got '0s'"),
    (_ROLE + 'max_ttl = 0', "mounts.pg.roles.r.max_ttl", "at least 1s, got 0"),
    ('[leases]\ndefault_ttl = "0s"', "leases.default_ttl", "at least 1s"),
    ('[leases]\ndefault_ttl = "0s"\nmax_ttl = "0s"', "leases.default_ttl", "at least 1s"),
    ('[leases]\nbackend_timeout = "0s"', "leases.backend_timeout", "at least 1s"),
    ('[leases]\nbackend_timeout = "500ms"', "leases.backend_timeout", "got '500ms'"),
    ('[leases]\nrevoke_backoff_base = "0s"', "leases.revoke_backoff_base", "at least 1s"),
    ('[leases]\nrevoke_backoff_base = "1h"\nrevoke_backoff_max = "1s"',
     "leases.revoke_backoff_max", "not be shorter than revoke_backoff_base"),
    ('[leases]\nirrevocable_retry_interval = "0s"', "leases.irrevocable_retry_interval",
     "at least 1s"),
    ('[leases]\ntombstone_retention = 0', "leases.tombstone_retention", "at least 1s"),
    ('[leases]\nrevoke_max_attempts = 0', "leases.revoke_max_attempts", "at least 1, got 0"),
    ('[leases]\nrevoke_workers = -2', "leases.revoke_workers", "at least 1, got -2"),
    ('[server]\nmax_request_size = -1', "server.max_request_size", "at least 1024, got -1"),
    ('[server]\nmax_request_size = 0', "server.max_request_size", "at least 1024"),
])
def test_values_that_make_the_broker_unusable_are_refused(tmp_path: Path, text: str, key: str,
                                                          fragment: str) -> None:
    """Zero TTLs, timeouts, intervals and sizes are refused naming the key and the minimum."""
    message = error_of(tmp_path, text)
    assert f": {key}: " in message and fragment in message, message


def test_documented_zeros_and_small_values_stay_valid(tmp_path: Path) -> None:
    """worker_stall_timeout = 0 (off), shutdown_grace = 0 and 1s minimums still load."""
    config = load_config(write(tmp_path, """
[server]
worker_stall_timeout = "0s"
shutdown_grace = 0
max_request_size = 1024
[leases]
revoke_backoff_base = "1s"
revoke_backoff_max = "1s"
"""))
    assert (config.server.worker_stall_timeout, config.server.shutdown_grace) == (0, 0)
    assert config.server.max_request_size == 1024
    assert config.leases.revoke_backoff_max == config.leases.revoke_backoff_base == 1.0


def test_a_password_file_others_may_read_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A group- or world-readable admin password file loads with a warning naming the
    file, the key and its mode (it loaded silently); an owner-only one loads quietly.
    The password itself is never in the message."""
    secret = tmp_path / "admin.pw"
    secret.write_text("s3cret-admin-pw\n")
    text = (f'[mounts.pg]\nplugin = "postgres"\nconnection_url = "postgresql://a@h/d"\n'
            f'password_file = "{secret}"\n')
    config = write(tmp_path, text)
    secret.chmod(0o644)
    with caplog.at_level("WARNING", logger="broker.config"):
        load_config(config)
    warned = [r.getMessage() for r in caplog.records if r.name == "broker.config"]
    assert len(warned) == 1 and "mounts.pg.password_file" in warned[0], warned
    assert "-rw-r--r--" in warned[0] and str(config) in warned[0], warned
    assert "s3cret-admin-pw" not in caplog.text
    caplog.clear()
    secret.chmod(0o600)
    with caplog.at_level("WARNING", logger="broker.config"):
        load_config(config)
    assert not [r for r in caplog.records if r.name == "broker.config"]
