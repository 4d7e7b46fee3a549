"""SCRAM-SHA-256 password verifiers, as PostgreSQL stores them (RFC 5802, RFC 7677).

``CREATE ROLE ... PASSWORD 'SCRAM-SHA-256$...'`` stores a verifier the client
computed instead of hashing a plaintext password on the server. The broker
does that, so the plaintext never reaches the database server: not its
statement log (``log_statement = ddl``), not ``pg_stat_statements``, not a
replica's logs. The broker runs the hashing ahead of time, in a thread (see
``broker.middleware.MountRuntime.take_password``).

It does not save the server any work: ``CREATE ROLE`` / ``ALTER ROLE`` with a
verifier checks that it does not match the empty password
(``plain_crypt_verify(role, password, "")`` in PostgreSQL's ``user.c``), one
PBKDF2 at the verifier's iteration count, as much as hashing a plaintext
would cost. Measured here (PostgreSQL 15): ``CREATE ROLE ... LOGIN VALID
UNTIL ...`` takes 0.25 ms with no password, 3.2-4.9 ms with a plaintext or a
SCRAM verifier. So the verifier costs the broker a PBKDF2 of its own per
role on top of the server's: the price of keeping the plaintext off the
server.

The PBKDF2 is ``cryptography``'s, not ``hashlib``'s: the same algorithm and
bytes, but its wheels carry their own OpenSSL, whose PBKDF2 took 0.52 ms
here against 1.02 ms for the Python's system OpenSSL 3.0 (hashlib), whose
per-iteration HMAC set-up dominates 4,096 short iterations
(docs/performance.md). Both release the GIL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

__all__ = ["DEFAULT_ITERATIONS", "scram_verifier", "verifies"]

#: PostgreSQL's default (``scram_iterations`` since PostgreSQL 16; fixed before).
DEFAULT_ITERATIONS = 4096
_SALT_BYTES = 16  # what PostgreSQL itself uses


def scram_verifier(password: str, iterations: int = DEFAULT_ITERATIONS,
                   salt: bytes | None = None) -> str:
    """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` for ``password``.

    The broker's passwords are ASCII letters and digits, which SASLprep leaves
    unchanged, so no normalisation is needed here (the plugin checks the
    alphabet before calling this). The PBKDF2 releases the GIL, so a thread
    runs it beside the event loop.
    """
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    salted = PBKDF2HMAC(SHA256(), 32, salt, iterations).derive(password.encode())
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def verifies(stored: str, password: str) -> bool:
    """Whether a SCRAM login with ``password`` succeeds against the ``stored`` verifier."""
    try:
        head, _keys = stored.removeprefix("SCRAM-SHA-256$").split("$", 1)
        iterations, salt = head.split(":")
        expected = scram_verifier(password, int(iterations), base64.b64decode(salt))
    except ValueError:  # not a SCRAM verifier (md5, plaintext)
        return False
    return hmac.compare_digest(expected, stored)
