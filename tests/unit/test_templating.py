"""Statement and username templates."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from broker.durations import MAX_SECONDS, format_duration, parse_duration
from broker.lease import new_lease_id
from broker.templating import generate_password, random_string, render, render_username


def test_render_replaces_known_placeholders() -> None:
    """{{name}} and friends are substituted, with or without inner spaces."""
    out = render('CREATE ROLE "{{name}}" PASSWORD \'{{ password }}\'', {"name": "u", "password": "p"})
    assert out == 'CREATE ROLE "u" PASSWORD \'p\''


def test_render_refuses_unknown_placeholders() -> None:
    """A typo in a template is an error, not an empty string in SQL."""
    with pytest.raises(ValueError, match="nmae"):
        render("DROP ROLE {{nmae}}", {"name": "u"})


def test_username_default_shape_and_alphabet() -> None:
    """Default usernames look like v-mount-role-random-unix and use a safe alphabet."""
    name = render_username(None, mount="pg", role="Read Only!", now=1700000000)
    assert re.fullmatch(r"v-pg-read-only--[a-z0-9]{10}-1700000000", name), name


def test_username_is_cut_to_backend_limit_keeping_random_part() -> None:
    """A long template is cut to the limit but the random part stays whole (uniqueness)."""
    names = {render_username("{{role}}-{{random 8}}", mount="m", role="r" * 40, max_length=16)
             for _ in range(200)}
    assert len(names) == 200
    assert all(len(n) <= 16 for n in names)


def test_username_never_starts_with_a_digit() -> None:
    """Identifiers start with a letter so every backend accepts them unquoted too."""
    name = render_username("{{unix_time}}-{{random}}", mount="m", role="r", now=1)
    assert name[0].isalpha()


def test_passwords_are_random_alphanumeric() -> None:
    """Passwords have no quote or backslash and mix classes."""
    pws = {generate_password() for _ in range(100)}
    assert len(pws) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", p) for p in pws)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), ("1h30m", 5400), ("120", 120),
    (45, 45), ("1500ms", 1), ("0s", 0),
])
def test_durations_parse(text: str | int, seconds: int) -> None:
    """Durations accept Vault's forms."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "1x", "h", "-5s", "1h 2", True, float("inf"), float("nan"),
                                 1e308, 10**20, "99999999999999999999", "36501d", "500ms"])
def test_bad_durations_are_refused(bad: object) -> None:
    """Malformed durations raise ValueError with the value in the message."""
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("huge", ["9" * 5000, "9" * 400 + "s", "1" * 11])
def test_huge_durations_are_refused_in_one_short_line(huge: str) -> None:
    """Thousands of digits: "longer than 100 years", the input cut short in the message
    (it used to echo Python's int-conversion limit, or overflow on "999...9s")."""
    with pytest.raises(ValueError, match="longer than 100 years") as err:
        parse_duration(huge)
    assert len(str(err.value)) < 100


def test_durations_stop_at_a_hundred_years() -> None:
    """100 years is the longest duration: every expiry from one is still a writable date."""
    assert parse_duration(MAX_SECONDS) == parse_duration("36500d") == MAX_SECONDS
    with pytest.raises(ValueError, match="longer than 100 years"):
        parse_duration(MAX_SECONDS + 1)


def test_format_duration_round_trips() -> None:
    """format_duration renders what parse_duration reads."""
    for s in (1, 59, 61, 3600, 5400, 90061):
        assert parse_duration(format_duration(s)) == s


@pytest.mark.parametrize("alphabet", [string.ascii_letters + string.digits,
                                      string.ascii_lowercase + string.digits, "ab", "x"])
def test_random_strings_use_the_whole_alphabet_and_only_it(alphabet: str) -> None:
    values = [random_string(alphabet, 40) for _ in range(500)]
    assert all(len(v) == 40 for v in values)
    seen = Counter("".join(values))
    assert set(seen) == set(alphabet)  # every character appears, no other does
    assert random_string(alphabet, 0) == ""


def test_random_string_is_uniform_on_a_skewed_alphabet_size() -> None:
    """200 symbols: plain ``byte % 200`` would give the first 56 twice the odds."""
    alphabet = "".join(chr(0x100 + i) for i in range(200))
    counts = Counter(random_string(alphabet, 200_000))
    low, high = counts[alphabet[0]] + counts[alphabet[55]], counts[alphabet[56]] + counts[alphabet[199]]
    assert len(counts) == 200
    # Expected ~1000 each; modulo bias would make low ~2x high. 6 sigma apart is far below that.
    assert 0.85 < low / high < 1.15
    assert max(counts.values()) < 1200 and min(counts.values()) > 800


def test_random_string_refuses_bad_alphabets() -> None:
    with pytest.raises(ValueError, match="alphabet"):
        random_string("", 4)
    with pytest.raises(ValueError, match="alphabet"):
        random_string("".join(chr(0x100 + i) for i in range(257)), 4)


def test_lease_ids_and_passwords_keep_their_shape() -> None:
    ids = {new_lease_id("pg", "ro") for _ in range(200)}
    assert len(ids) == 200
    for lease_id in ids:
        prefix, _, rand = lease_id.rpartition("/")
        assert prefix == "pg/creds/ro" and len(rand) == 24
        assert set(rand) <= set(string.ascii_letters + string.digits)
    pw = generate_password(32)
    assert len(pw) == 32 and pw.isalnum() and pw.isascii()
