"""plugins/_scram.py against an independent SCRAM-SHA-256 computation (RFC 5802 / 7677).

The verifier's PBKDF2 runs through ``cryptography`` for speed; this checks it
produces exactly what the textbook construction with ``hashlib`` does, so a
change of KDF library cannot silently produce verifiers PostgreSQL rejects
(the integration tests then log in with them on a real server).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from plugins._scram import DEFAULT_ITERATIONS, scram_verifier, verifies


def textbook(password: str, iterations: int, salt: bytes) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return (f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
            f"${b64(stored).decode()}:{b64(server).decode()}")


@pytest.mark.parametrize("iterations", [1, 2, DEFAULT_ITERATIONS, 10_000])
def test_the_verifier_is_the_textbook_scram_sha_256(iterations: int) -> None:
    salt = bytes(range(16))
    assert scram_verifier("Zq3xV8pLw2", iterations, salt) == textbook("Zq3xV8pLw2", iterations, salt)


def test_a_fresh_salt_each_time_and_only_the_password_verifies() -> None:
    first, second = scram_verifier("p4ssw0rd"), scram_verifier("p4ssw0rd")
    assert first != second  # random salt
    assert first.startswith(f"SCRAM-SHA-256${DEFAULT_ITERATIONS}:")
    assert verifies(first, "p4ssw0rd") and verifies(second, "p4ssw0rd")
    assert not verifies(first, "p4ssw0rD")
    assert not verifies("md5" + "0" * 32, "p4ssw0rd")
