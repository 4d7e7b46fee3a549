"""Secrets are cut from backend error text in any letter case.

PostgreSQL folds an unquoted identifier to lower case, so a password that a
broken template put where an identifier goes (``SELECT {{password}}``) came
back in the error as ``column "<password, lower-cased>" does not exist``,
and both redactions (the plugin's and the runtime's) matched it byte for byte only.
"""

from __future__ import annotations

from broker.middleware import redact_text
from plugins._sql import REDACTED, redact

PASSWORD = "Ab3dEfGhIjKlMnOpQrStUvWx"


def test_the_plugins_redaction_ignores_case() -> None:
    text = f'column "{PASSWORD.lower()}" does not exist; near {PASSWORD.upper()[:10]}'
    out = redact(text, [PASSWORD])
    assert PASSWORD.lower() not in out and PASSWORD.upper()[:10] not in out
    assert out.count(REDACTED) == 2


def test_the_runtimes_redaction_ignores_case() -> None:
    out = redact_text(f"failed: {PASSWORD.lower()} and {PASSWORD}", [PASSWORD])
    assert out == "failed: [REDACTED] and [REDACTED]"


def test_redaction_keeps_regex_characters_literal() -> None:
    secret = "a.b*c+d(e)[f]"
    assert redact_text("x a.b*c+d(e)[f] y aXbbc", [secret]) == "x [REDACTED] y aXbbc"
    assert redact("x A.B*C+D(E)[F] y", [secret]) == f"x {REDACTED} y"


def test_an_apostrophe_in_the_servers_prose_is_not_a_literal() -> None:
    """MySQL's "Can't connect ... '127.0.0.1'" lost its message to a literal that
    started at the apostrophe; the address is still cut, the words stay."""
    out = redact("(2003) Can't connect to MySQL server on '127.0.0.1' (111)")
    assert out == f"(2003) Can't connect to MySQL server on '{REDACTED}' (111)"


def test_prefixed_literals_are_still_literals() -> None:
    out = redact("ALTER ROLE x PASSWORD E'ab\\'cd' VALID UNTIL N'2030'")
    assert "ab" not in out and "cd" not in out and "2030" not in out
