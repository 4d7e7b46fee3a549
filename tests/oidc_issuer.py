"""A real OIDC issuer for tests: keys made at run time, discovery + JWKS over HTTP(S).

It mints tokens shaped like the ones GitHub Actions and GitLab CI hand their
jobs, and the broken ones an attacker would try: unknown keys, ``alg: none``,
HS256 "signed" with the issuer's public key, expired, not yet valid, wrong
audience or issuer. It also rotates keys, so the broker's unknown-kid refresh
can be shown to work, and goes down (``outage``) to show what the broker does
then.

Usage::

    with OIDCIssuer() as issuer:              # serves on a free loopback port
        token = issuer.github_token(repository="acme/app")
        config = f'oidc_discovery_url = "{issuer.url}"'

The issuer runs its own event loop in a background thread, like
``tests/integration/broker_harness.BrokerThread``, so sync tests (hvac) and the
broker's loop can both reach it. ``jwks()`` and ``discovery()`` are also usable
without the server (unit tests feed them to the key cache directly).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

__all__ = ["OIDCIssuer", "SigningKey"]

#: how a token is signed: with one of the issuer's keys, or the way an attacker would.
SIGNINGS = frozenset({"key", "none", "hs256-public-key", "unknown-key"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SigningKey:
    """A private key the issuer signs with, and what its JWKS entry says about it."""

    kid: str
    alg: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, alg: str = "RS256", kid: str | None = None) -> SigningKey:
        private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if alg.startswith(("RS", "PS")):
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":
            private = ec.generate_private_key(ec.SECP384R1())
        else:
            raise ValueError(f"no key type for {alg}")
        return cls(kid or f"{alg.lower()}-{secrets.token_hex(4)}", alg, private)

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> str:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()


@dataclass
class OIDCIssuer:
    """A test OIDC provider: ``/.well-known/openid-configuration`` and ``/jwks``."""

    tls: bool = False
    rsa_key: SigningKey = field(default_factory=lambda: SigningKey.generate("RS256", "rsa-1"))
    ec_key: SigningKey = field(default_factory=lambda: SigningKey.generate("ES256", "ec-1"))
    #: the keys served in the JWKS, in order.
    published: list[SigningKey] = field(default_factory=list)
    port: int = field(default_factory=_free_port)
    #: requests served, per path (to show caching and rate limiting).
    requests: dict[str, int] = field(default_factory=dict)
    #: PEM of the self-signed certificate when ``tls`` (give it as ``jwks_ca_pem``).
    ca_pem: str | None = None
    #: serve each document in pieces of this many bytes, ``chunk_pause`` apart, as a
    #: JWKS arrives over a real network (several reads); None: in one write.
    chunk_size: int | None = None
    chunk_pause: float = 0.05
    #: seconds to wait before answering (a slow or hung issuer).
    delay: float = 0.0
    #: JWK members left out of the served JWKS (e.g. ``("alg", "use")``, as some issuers do).
    omit_jwk_members: tuple[str, ...] = ()
    #: an outage: ``"hang"`` holds every request (a blackholed issuer) until the outage
    #: ends or the server stops, then answers as the issuer then would; ``"error"``
    #: answers 503 at once. Can be changed while the issuer runs.
    outage: str | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stopped: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def __post_init__(self) -> None:
        if not self.published:
            self.published = [self.rsa_key, self.ec_key]

    # -- what it serves -------------------------------------------------------------
    @property
    def url(self) -> str:
        """The issuer URL: the ``iss`` of its tokens and the OIDC discovery URL."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_url,
            "subject_types_supported": ["public", "pairwise"],
            "response_types_supported": ["id_token"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref",
                                 "repository", "repository_owner", "run_id", "actor"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "scopes_supported": ["openid"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{m: v for m, v in k.public_jwk().items()
                          if m not in self.omit_jwk_members} for k in self.published]}

    def rotate(self, alg: str = "RS256") -> SigningKey:
        """Publish a new key with a new kid (old keys stay published); returns it."""
        key = SigningKey.generate(alg)
        self.published.append(key)
        return key

    def count(self, path: str) -> int:
        return self.requests.get(path, 0)

    # -- minting --------------------------------------------------------------------
    def mint(
        self,
        claims: dict[str, Any],
        *,
        key: SigningKey | None = None,
        signing: str = "key",
        kid: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """A compact JWS of ``claims``.

        ``signing``: ``key`` (a real signature by ``key``, default the RSA key),
        ``unknown-key`` (a fresh key the JWKS does not have, kid ``rogue-...``),
        ``none`` (``alg: none``, empty signature), ``hs256-public-key`` (HMAC-SHA256
        keyed with the PEM of ``key``'s public key: the algorithm confusion attack).
        ``kid`` overrides the header's key id.
        """
        if signing not in SIGNINGS:
            raise ValueError(f"signing must be one of {sorted(SIGNINGS)}")
        key = key or self.rsa_key
        if signing == "unknown-key":
            key = SigningKey.generate(key.alg, f"rogue-{secrets.token_hex(4)}")
        header = {"typ": "JWT", "kid": kid or key.kid, **(headers or {})}
        if signing in {"key", "unknown-key"}:
            return jwt.encode(claims, key.private, algorithm=key.alg, headers=header)
        alg = "none" if signing == "none" else "HS256"
        signing_input = (_b64(json.dumps({**header, "alg": alg}).encode()) + "."
                         + _b64(json.dumps(claims).encode()))
        if signing == "none":
            return signing_input + "."
        # PyJWT refuses to HMAC with a PEM key (good); an attacker does it by hand.
        mac = hmac.new(key.public_pem().encode(), signing_input.encode(), hashlib.sha256)
        return signing_input + "." + _b64(mac.digest())

    def _times(self, *, lifetime: int, expired: bool, nbf_in: int | None) -> dict[str, int]:
        now = int(time.time())
        if expired:
            # Well past any leeway: issued 20 minutes ago, expired 10 minutes ago.
            return {"iat": now - 1200, "nbf": now - 1200, "exp": now - 600}
        nbf = now + nbf_in if nbf_in is not None else now - 5
        return {"iat": now - 5, "nbf": nbf, "exp": now + lifetime}

    def github_claims(
        self,
        *,
        repository: str = "acme/app",
        ref: str = "refs/heads/main",
        aud: str | list[str] = "broker",
        iss: str | None = None,
        run_id: str = "4711",
        actor: str = "octocat",
        workflow: str = "deploy",
        lifetime: int = 300,
        expired: bool = False,
        nbf_in: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Claims as GitHub Actions puts them in a job's OIDC token (iss is this issuer)."""
        owner = repository.split("/", 1)[0]
        claims: dict[str, Any] = {
            "jti": secrets.token_hex(8),
            "sub": f"repo:{repository}:ref:{ref}",
            "aud": aud,
            "ref": ref,
            "sha": secrets.token_hex(20),
            "repository": repository,
            "repository_owner": owner,
            "repository_owner_id": "1234",
            "repository_id": "5678",
            "repository_visibility": "private",
            "run_id": run_id,
            "run_number": "12",
            "run_attempt": "1",
            "actor": actor,
            "actor_id": "42",
            "workflow": workflow,
            "head_ref": "",
            "base_ref": "",
            "event_name": "push",
            "ref_type": "branch",
            "job_workflow_ref": f"{repository}/.github/workflows/{workflow}.yml@{ref}",
            "runner_environment": "github-hosted",
            "iss": iss if iss is not None else self.url,
            **self._times(lifetime=lifetime, expired=expired, nbf_in=nbf_in),
        }
        claims.update(extra)
        return claims

    def gitlab_claims(
        self,
        *,
        project_path: str = "acme/app",
        ref: str = "main",
        ref_type: str = "branch",
        aud: str | list[str] = "broker",
        iss: str | None = None,
        pipeline_id: str = "9001",
        job_id: str = "9002",
        user_login: str = "alice",
        lifetime: int = 300,
        expired: bool = False,
        nbf_in: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Claims as a GitLab CI ``id_tokens`` token carries them (iss is this issuer)."""
        namespace = project_path.rsplit("/", 1)[0]
        claims: dict[str, Any] = {
            "jti": secrets.token_hex(8),
            "sub": f"project_path:{project_path}:ref_type:{ref_type}:ref:{ref}",
            "aud": aud,
            "namespace_id": "72",
            "namespace_path": namespace,
            "project_id": "20",
            "project_path": project_path,
            "user_id": "5",
            "user_login": user_login,
            "user_email": f"{user_login}@example.com",
            "pipeline_id": pipeline_id,
            "pipeline_source": "push",
            "job_id": job_id,
            "ref": ref,
            "ref_type": ref_type,
            "ref_path": f"refs/heads/{ref}",
            "ref_protected": "true",
            "runner_id": 3,
            "runner_environment": "gitlab-hosted",
            "iss": iss if iss is not None else self.url,
            **self._times(lifetime=lifetime, expired=expired, nbf_in=nbf_in),
        }
        claims.update(extra)
        return claims

    def github_token(self, *, key: SigningKey | None = None, signing: str = "key",
                     kid: str | None = None, **claims: Any) -> str:
        """A GitHub Actions-shaped token; ``claims`` go to :meth:`github_claims`."""
        return self.mint(self.github_claims(**claims), key=key, signing=signing, kid=kid)

    def gitlab_token(self, *, key: SigningKey | None = None, signing: str = "key",
                     kid: str | None = None, **claims: Any) -> str:
        """A GitLab CI-shaped token; ``claims`` go to :meth:`gitlab_claims`."""
        return self.mint(self.gitlab_claims(**claims), key=key, signing=signing, kid=kid)

    # -- serving --------------------------------------------------------------------
    def _app(self) -> web.Application:
        async def serve(request: web.Request) -> web.StreamResponse:
            path = request.path
            self.requests[path] = self.requests.get(path, 0) + 1
            if self.delay:
                await asyncio.sleep(self.delay)
            # Polled: ``outage`` is set from the test's thread, not this loop's.
            while self.outage == "hang" and not (self._stopped and self._stopped.is_set()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            if self.outage is not None:
                return web.json_response({"error": "issuer down"}, status=503)
            body = self.discovery() if path.endswith("openid-configuration") else self.jwks()
            if self.chunk_size is None:
                return web.json_response(body)
            data = json.dumps(body).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for start in range(0, len(data), self.chunk_size):
                await resp.write(data[start:start + self.chunk_size])
                await asyncio.sleep(self.chunk_pause)
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", serve)
        app.router.add_get("/jwks", serve)
        return app

    def _ssl_context(self) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-oidc-issuer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.ca_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_file.write_text(self.ca_pem)
            key_file.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            ctx.load_cert_chain(cert_file, key_file)
        return ctx

    def start(self) -> OIDCIssuer:
        ctx = self._ssl_context() if self.tls else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, args=(ctx,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("OIDC issuer did not start within 30s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self, ctx: ssl.SSLContext | None) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve(ctx))
        self._loop.close()

    async def _serve(self, ctx: ssl.SSLContext | None) -> None:
        runner = web.AppRunner(self._app(), access_log=None)
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx).start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._stopped = asyncio.Event()
        self._ready.set()
        await self._stopped.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)

    def __enter__(self) -> OIDCIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
