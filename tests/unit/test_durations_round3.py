"""Durations under one second are refused; fractions above it truncate to whole seconds.

0 means "the default" wherever a TTL or an increment is read, so a duration
that truncated to 0 ("500ms", 0.5) silently became the default (an hour,
say), and a config key such as ``worker_stall_timeout`` turned off. The live
API and a real broker's answers are in tests/integration/test_pg_round3.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli import main
from broker.config import ConfigError, load_config
from broker.durations import parse_duration

#: a JWT auth mount that loads without reaching its JWKS URL.
_JWT = """
[auth.jwt.ci]
jwks_url = "http://127.0.0.1:1/jwks"
bound_issuer = "https://ci.example"
clock_skew_leeway = "{leeway}"
[auth.jwt.ci.roles.deploy]
token_ttl = "1h"
"""


@pytest.mark.parametrize("value", ["500ms", "999ms", " 1ms ", "0.5s", "0.99s", 0.5, 0.999, 1e-9])
def test_a_duration_under_one_second_is_refused(value: str | float) -> None:
    """A non-zero duration under 1s raises a one-line ValueError showing the value."""
    with pytest.raises(ValueError) as err:
        parse_duration(value)
    message = str(err.value)
    assert "must be at least 1s" in message and "whole seconds" in message, message
    assert repr(value) in message and "\n" not in message


@pytest.mark.parametrize(("value", "seconds"), [
    ("0", 0), ("0s", 0), ("0ms", 0), ("0m0s", 0), (0, 0), (0.0, 0),
    ("1000ms", 1), ("1500ms", 1), ("1.5s", 1), (1.5, 1), ("1s999ms", 1), ("2.999s", 2),
    ("4.1m", 246), ("0.1h", 360), ("1.15h", 4140), ("0.7d", 60480), (245.9999999999, 246),
])
def test_zero_stays_the_default_and_fractions_truncate_exactly(value: str | float,
                                                               seconds: int) -> None:
    """Explicit zeros stay 0; fractions drop to whole seconds ("4.1m" is 246s, not 245s)."""
    assert parse_duration(value) == seconds


def _config_error(tmp_path: Path, body: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


@pytest.mark.parametrize(("body", "key"), [
    ('[server]\nworker_stall_timeout = "500ms"\n', "server.worker_stall_timeout"),
    ('[server]\nshutdown_grace = "250ms"\n', "server.shutdown_grace"),
    ('[server]\nidle_timeout = "0.5s"\n', "server.idle_timeout"),
    (_JWT.format(leeway="500ms"), "auth.jwt.ci.clock_skew_leeway"),
])
def test_a_config_duration_under_one_second_names_the_key(tmp_path: Path, body: str,
                                                          key: str) -> None:
    """A sub-second config value is a one-line config error naming the file and the key
    (worker_stall_timeout = "500ms" used to turn the watchdog off)."""
    message = _config_error(tmp_path, body)
    assert message.startswith(str(tmp_path / "broker.toml")), message
    assert f": {key}: " in message and "must be at least 1s" in message, message
    assert "\n" not in message


def test_config_fractions_truncate_to_whole_seconds(tmp_path: Path) -> None:
    """Config durations with fractions load as whole seconds, computed exactly."""
    path = tmp_path / "broker.toml"
    path.write_text('[leases]\ndefault_ttl = "4.1m"\nmax_ttl = "1.5h"\n'
                    '[server]\nworker_stall_timeout = "4.1m"\n')
    config = load_config(path)
    assert (config.leases.default_ttl, config.leases.max_ttl) == (246, 5400)
    assert config.server.worker_stall_timeout == 246


@pytest.mark.parametrize("argv", [
    ["creds", "pg/ro", "--ttl", "500ms"],
    ["lease", "renew", "pg/creds/ro/x", "--increment", "0.5s"],
    ["token", "create", "--ttl", "999ms"],
])
def test_cli_refuses_a_duration_under_one_second(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 argv: list[str]) -> None:
    """`broker creds --ttl 500ms` (and --increment, token --ttl) is a usage error, exit 2,
    before any request is sent (it used to ask for the mount's default TTL)."""
    monkeypatch.setenv("BROKER_ADDR", "http://127.0.0.1:1")
    monkeypatch.setenv("BROKER_TOKEN", "t")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("broker: error: ") and err.count("\n") == 1, err
    assert "must be at least 1s" in err, err


@pytest.mark.parametrize("text", ["\u0661\u0662\u0663", "\uff11\uff12\uff13s", "1\u0663m"])
def test_only_ascii_digits_are_a_duration(text: str) -> None:
    """Arabic-Indic and full-width digits were 123 s, though every other number
    the API takes is ASCII only (security QA)."""
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)
