"""[storage] url parameters are checked when the config loads, naming file and key,
never showing the URL or its password; the store takes the same parameters the same way."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from broker.config import ConfigError, load_config
from broker.store.postgres import PostgresStore, store_params

PASSWORD = "hunter2-s3cret"


def error_of(tmp_path: Path, url: str) -> ConfigError:
    path = tmp_path / "broker.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    text = str(error)
    assert text.startswith(f"{path}: storage.url: "), text
    assert "\n" not in text
    return error


PG = f"postgresql://broker:{PASSWORD}@db.internal:5432/broker"


@pytest.mark.parametrize(("query", "problem"), [
    ("command_timeout=abc", "command_timeout must be a number of seconds greater than 0"),
    ("command_timeout=0", "command_timeout must be a number of seconds greater than 0"),
    ("command_timeout=-5", "command_timeout must be a number of seconds greater than 0"),
    ("command_timeout=nan", "command_timeout must be a number of seconds greater than 0"),
    ("command_timeout=inf", "command_timeout must be a number of seconds greater than 0"),
    ("command_timeout=", "command_timeout must be a number of seconds greater than 0"),
    ("pool_min_size=lots", "pool_min_size must be a whole number"),
    ("pool_max_size=2.5", "pool_max_size must be a whole number"),
    ("pool_min_size=-1", "pool_min_size must be a whole number"),
    ("pool_max_size=0", "pool_max_size must be at least 1"),
    ("pool_min_size=5&pool_max_size=2", "pool_min_size (5) must not be greater than "
                                        "pool_max_size (2)"),
    ("pool_min_size=11", "pool_min_size (11) must not be greater than pool_max_size (10)"),
    ("pool_max_size=4&pool_max_size=8", "pool_max_size is given twice"),
])
def test_a_bad_store_parameter_fails_the_load(tmp_path: Path, query: str, problem: str) -> None:
    """It used to load, and the broker failed only when the store opened, naming
    neither the file nor the key."""
    error = error_of(tmp_path, f"{PG}?sslmode=prefer&{query}")
    assert error.message.startswith(problem), str(error)
    assert PASSWORD not in str(error) and "db.internal" not in str(error)


def test_a_url_without_a_database_fails_the_load(tmp_path: Path) -> None:
    """The store refuses it when it opens; the config now refuses it first."""
    error = error_of(tmp_path, f"postgresql://broker:{PASSWORD}@db.internal:5432/")
    assert "names no database" in error.message and PASSWORD not in str(error)


def test_good_parameters_load_unchanged(tmp_path: Path) -> None:
    """Valid store parameters, and ones for asyncpg (sslmode), pass through as written."""
    url = "postgresql://broker@db.internal:5432/broker?sslmode=require&pool_min_size=0" \
          "&pool_max_size=16&command_timeout=2.5"
    path = tmp_path / "broker.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n')
    assert load_config(path).storage.url == url


def test_unknown_parameters_are_left_to_the_driver() -> None:
    """As before: what the store does not know goes to asyncpg, in order."""
    params = store_params("sslmode=require&pool_max_size=3&application_name=x&foo=")
    assert (params.pool_min_size, params.pool_max_size, params.command_timeout) == (1, 3, 15.0)
    assert params.rest == [("sslmode", "require"), ("application_name", "x"), ("foo", "")]


def test_defaults() -> None:
    """No parameters: pool 1..10, command_timeout 15 s."""
    params = store_params("")
    assert params == (1, 10, 15.0, [])
    assert math.isfinite(params.command_timeout)


def test_the_store_reads_parameters_the_same_way() -> None:
    """PostgresStore.from_url uses store_params: same rules, the URL shown redacted."""
    store = PostgresStore.from_url(f"{PG}?pool_max_size=4&sslmode=require&command_timeout=9")
    assert (store.pool_min_size, store.pool_max_size, store.command_timeout) == (1, 4, 9.0)
    assert store.dsn == f"{PG}?sslmode=require"
    with pytest.raises(ValueError) as info:
        PostgresStore.from_url(f"{PG}?command_timeout=nan")
    assert "command_timeout must be a number" in str(info.value)
    assert "broker:***@db.internal" in str(info.value) and PASSWORD not in str(info.value)


@pytest.mark.parametrize(("query", "problem"), [
    ("command_timeout=abc", "command_timeout must be a number of seconds > 0"),
    ("timeout=3", "unknown parameter 'timeout'"),
])
def test_a_bad_sqlite_parameter_fails_the_load(tmp_path: Path, query: str, problem: str) -> None:
    """The SQLite store's own check of its URL runs at load time too."""
    error = error_of(tmp_path, f"sqlite:///data/b.db?{query}")
    assert problem in error.message, str(error)
