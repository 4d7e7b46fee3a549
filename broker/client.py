"""A small synchronous HTTP client for the broker API, used by the ``broker`` CLI.

stdlib only (urllib): the CLI starts in tens of milliseconds and needs no event
loop for one request at a time.
"""

from __future__ import annotations

import json as jsonlib
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_ADDRESS", "Client", "ClientError", "clean_token"]

DEFAULT_ADDRESS = "http://127.0.0.1:8200"
#: longest server error text we show (a proxy's HTML error page is not a message):
#: generous, so a broker's own error is never shortened (they explain what to do).
_MAX_ERROR_TEXT = 1000


class ClientError(Exception):
    """A request failed: ``status`` is the HTTP status, or 0 when no answer came back.

    ``str()`` is one line that a user can act on; ``errors`` is the server's list.
    """

    def __init__(self, status: int, errors: list[str], *, bare: bool = False) -> None:
        self.status = status
        #: the server answered ``{"errors": []}``: with 404, Vault's empty listing.
        self.bare = bare
        self.errors = [_one_line(e) for e in errors] or ["unknown error"]
        text = "; ".join(self.errors)
        super().__init__(f"{text} (HTTP {status})" if status else text)


def _one_line(text: object) -> str:
    line = " ".join(str(text).split())
    if len(line) <= _MAX_ERROR_TEXT:
        return line
    # Cut between words: "(GET sys/leases/irrev..." read as a path that does not exist.
    cut = line[: _MAX_ERROR_TEXT - 4].rpartition(" ")[0] or line[: _MAX_ERROR_TEXT - 4]
    return cut + " ..."


def clean_token(token: str | None) -> str | None:
    """``token`` without surrounding whitespace; ValueError if it cannot be sent as a header.

    A token file saved on Windows ends in CR LF, and ``$(cat file)`` strips only
    the LF: the CR would make urllib raise "Invalid header value". Control or
    non-ASCII characters left inside mean the wrong file or a paste gone wrong.
    The message never shows the token.
    """
    if token is None:
        return None
    token = token.strip()
    if any(not " " <= ch < "\x7f" for ch in token):
        raise ValueError("the token contains a control or non-ASCII character "
                         "(a line break? check the token file or variable)")
    return token or None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would resend X-Vault-Token to wherever it points; Vault's
    # standby redirects are not part of broker, so treat one as an error.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """Talks to one broker at ``address`` with ``token`` (sent as ``X-Vault-Token``)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        skip_verify: bool = False,
        timeout: float = 60.0,
    ) -> None:
        address = address.strip()
        parts = _split_address(address)
        if parts is not None and "@" in parts.netloc:
            # Not echoed: the part before "@" may be a password. urllib would not
            # send it anyway (it took it for part of the host name).
            raise ValueError("address must not hold a user name or password (http(s)://HOST:PORT;"
                             " the token goes in --token or BROKER_TOKEN)")
        if parts is None or parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"address must look like http(s)://HOST:PORT, got {address!r}")
        self.address = address.rstrip("/")
        self.token = clean_token(token)
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=ca_file)
            if skip_verify:
                # Explicit operator opt-in (--tls-skip-verify), as in the vault CLI.
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=context))
        # No ProxyHandler from the environment: credentials and tokens must not
        # silently travel through an http_proxy the user set for something else.
        handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        """``sys/health`` or ``/v1/sys/health`` -> the full URL, path segments quoted."""
        path = path.lstrip("/")
        if not path.startswith("v1/"):
            path = "v1/" + path
        url = self.address + "/" + urllib.parse.quote(path, safe="/-._~")
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        return f"{url}?{urllib.parse.urlencode(query)}" if query else url

    def request(
        self,
        method: str,
        path: str,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        """Send one request; return the decoded JSON object, or None for an empty answer.

        Raises ClientError for any non-2xx answer and for connection failures.
        ``method`` may be ``LIST`` (Vault's custom verb), sent as is.
        """
        body = None
        headers = {"Accept": "application/json"}
        if self.token:
            headers["X-Vault-Token"] = self.token
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.url(path, params), data=body, headers=headers, method=method.upper()
        )
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            exc.close()
            raise ClientError(exc.code, _errors_from(raw, exc.reason),
                              bare=_bare_errors(raw)) from None
        except urllib.error.URLError as exc:
            raise ClientError(0, [self._connect_error(exc.reason)]) from None
        except TimeoutError:
            raise ClientError(
                0, [f"no answer from {self.address} within {timeout or self.timeout:g}s"]
            ) from None
        except (ConnectionError, OSError) as exc:
            raise ClientError(0, [self._connect_error(exc)]) from None
        if not raw.strip():
            return None
        try:
            data = jsonlib.loads(raw)
        except ValueError:
            raise ClientError(
                0, [f"{self.address} answered with something that is not JSON"]
            ) from None
        if not isinstance(data, dict):
            raise ClientError(0, [f"{self.address} answered with JSON that is not an object"])
        return data

    def _connect_error(self, reason: object) -> str:
        if isinstance(reason, ssl.SSLCertVerificationError):
            detail = reason.verify_message or str(reason)
            return f"TLS certificate of {self.address} not trusted: {detail} (use --tls-ca FILE)"
        if isinstance(reason, TimeoutError):
            return f"no answer from {self.address} within {self.timeout:g}s"
        if isinstance(reason, OSError) and reason.strerror:
            detail = reason.strerror
        else:
            detail = str(reason)
        return f"cannot connect to {self.address}: {detail}"


def _split_address(address: str) -> urllib.parse.SplitResult | None:
    """The parts of ``address``, or None where urllib or http.client would raise later
    (``[::1`` without ``]``, a port that is not a number, a space or control character)."""
    if any(not "!" <= ch < "\x7f" for ch in address):
        return None
    try:
        parts = urllib.parse.urlsplit(address)
        parts.port  # noqa: B018 - the property raises on a malformed port
    except ValueError:
        return None
    return parts


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bare_errors(raw: bytes) -> bool:
    """Whether the answer is exactly ``{"errors": []}`` (Vault's empty LIST, with 404)."""
    try:
        return bool(jsonlib.loads(raw) == {"errors": []})
    except ValueError:
        return False


def _errors_from(raw: bytes, reason: object) -> list[str]:
    """The server's ``errors`` list; else whatever one-line text the answer had."""
    try:
        data = jsonlib.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("errors"), list):
        # Vault answers an empty LIST with 404 and an empty errors list.
        return [str(e) for e in data["errors"]] or [str(reason or "request failed")]
    text = raw.decode("utf-8", "replace").strip()
    if text and not text.lstrip().startswith("<"):
        return [text]
    return [str(reason or "request failed")]
