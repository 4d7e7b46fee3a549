"""aiohttp's C request parser, with the pure-Python one for connections that send ``LIST``.

Vault clients (hvac, the vault CLI, ``curl -X LIST``) send the non-standard
``LIST`` method. aiohttp's C parser (llhttp) rejects methods outside its own
table with "400 Invalid method"; the pure-Python parser accepts any RFC 9110
token but costs ~80 µs more per request. So every connection starts on the C
parser, and moves to the Python parser for good at its first ``LIST``.

Moving must happen exactly at a message boundary, or the two parsers would
disagree on where requests start (request smuggling). The C parser does not
expose its byte position, so:

- incoming bytes are split before every ``LIST `` (a request may follow a
  body directly, so anywhere; a ``LIST`` cut by a TCP read counts: the start
  already fed is remembered), and fed to the C parser piece by piece;
- a piece whose first line the C parser rejects with *invalid method* proves
  the C parser was between messages when it started: otherwise llhttp is in a
  body (no error), in headers or a request line (a bad header token, URL or
  version, not a bad method), in a chunk header (a bad chunk size), or inside
  a method (``GLIST``: llhttp then fails at the "L", not at the "S", which the
  check tells apart). Every byte before the piece was parsed into messages
  already returned, so the Python parser takes over from the piece's first
  byte;
- any other error, or one on a later line (or a piece whose first line
  appears again in it, so llhttp's quote of the line is ambiguous), is
  answered 400 as before.

The C parser buffers bytes it has not parsed only while it is paused: with its
queue of unconsumed requests full (32, like the protocol's own limit), or while
a request body over the read buffer waits for its handler. In the first case a
``LIST`` piece waits in this wrapper until the protocol drains its queue (it
then feeds ``b""``); in the second this connection never switches (a ``LIST``
pipelined behind a >64 KiB body gets a 400; Vault clients do not pipeline).
"""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import http_parser
from aiohttp.http_exceptions import BadHttpMethod

__all__ = ["ListAwareRequestParser"]

_LIST = b"LIST "
_CRLF = b"\r\n"
_VERB_STARTS = (b"LIS", b"LIST")  # cut LIST verbs that llhttp rejects at once
_KEEP = len(_CRLF) + len(_LIST) - 1  # stream bytes kept to find a LIST cut by a read

_FeedResult = tuple[list[Any], bool, bytes]


class ListAwareRequestParser:
    """Quacks like aiohttp's ``HttpRequestParser`` as ``RequestHandler`` uses it."""

    def __init__(self, protocol: Any, loop: Any, limit: int, **kwargs: Any) -> None:
        self._args = (protocol, loop, limit)
        self._kwargs = kwargs
        self._c: Any = http_parser.HttpRequestParserC(protocol, loop, limit, **kwargs)
        self._py: Any = None
        # The protocol's queue limit; at that many unconsumed messages the C
        # parser may hold unparsed bytes (see the module docstring).
        self._queue_max: int = kwargs.get("max_msg_queue_size", 0)
        self._c_unconsumed = 0  # messages the C parser returned, not yet consumed
        self._c_body_paused = False  # the C parser was paused inside a body: never switch
        self._recent = _CRLF  # last bytes fed to the C parser; the stream start is a line start
        self._deferred = b""  # a LIST piece (and what follows) waiting for the queue to drain
        self._deferred_prefix = b""  # its verb's first bytes, already fed to the C parser

    # --- what RequestHandler calls --------------------------------------------

    def feed_data(self, data: bytes) -> _FeedResult:
        if self._py is not None:
            return self._py.feed_data(data)  # type: ignore[no-any-return]
        if self._deferred:
            return self._resume_deferred(data)
        if not data or (_LIST not in data and b"L" not in self._recent
                        and not data.endswith(_VERB_STARTS)):  # the fast path: C-speed scans
            self._fed(data)
            return self._feed_c(data)
        return self._feed_pieces(data)

    def feed_eof(self) -> Any:
        return (self._py or self._c).feed_eof()

    def set_upgraded(self, val: bool) -> None:
        (self._py or self._c).set_upgraded(val)

    def pause_reading(self) -> None:
        # A body's StreamReader is over its limit: whichever parser feeds it pauses.
        if self._py is None:
            self._c_body_paused = True
        (self._py or self._c).pause_reading()

    def message_consumed(self) -> None:
        # FIFO: the C parser's messages are all consumed before the Python parser's.
        if self._c_unconsumed:
            self._c_unconsumed -= 1
            self._c.message_consumed()
        elif self._py is not None:
            self._py.message_consumed()

    # --- internals -------------------------------------------------------------

    def _fed(self, data: bytes) -> None:
        if data:
            self._recent = (self._recent + data)[-_KEEP:]

    def _feed_c(self, data: bytes) -> _FeedResult:
        messages, upgraded, tail = self._c.feed_data(data)
        self._c_unconsumed += len(messages)
        return messages, upgraded, tail

    def _list_starts(self, data: bytes) -> list[int]:
        """Offsets in ``data`` where ``LIST `` (or, at the end, ``LIS``/``LIST``) begins.

        Any offset, not only after a CRLF: a request follows a body directly.
        An offset is negative when the verb began in bytes already fed
        (``self._recent``): a ``LIST`` cut by a read.
        """
        joined = self._recent + data
        k = len(self._recent)
        starts = []
        pos = joined.find(_LIST, max(0, k - len(_LIST) + 1))
        while pos != -1:
            starts.append(pos - k)
            pos = joined.find(_LIST, pos + 1)
        # A read that ends inside the verb: llhttp already rejects "LIS" (no
        # method starts so), so that piece must be a candidate too.
        for verb_start in _VERB_STARTS:
            if joined.endswith(verb_start):
                starts.append(len(joined) - len(verb_start) - k)
        return starts

    def _resume_deferred(self, data: bytes) -> _FeedResult:
        """Retry a deferred ``LIST`` piece once the protocol has drained its queue."""
        data, self._deferred = self._deferred + data, b""
        # Let the C parser finish the bytes it buffered while paused, before our piece.
        messages, upgraded, tail = self._feed_c(b"")
        if upgraded:
            return messages, True, tail + data
        # So that _list_starts finds the deferred piece's verb again, prefix included.
        self._recent = (_CRLF + self._deferred_prefix)[-_KEEP:]
        more, upgraded, tail = self._feed_pieces(data)
        return messages + more, upgraded, tail

    def _feed_pieces(self, data: bytes) -> _FeedResult:
        """Feed ``data`` to the C parser cut before each line-start ``LIST``."""
        starts = self._list_starts(data)
        cuts = sorted({0, *(max(p, 0) for p in starts), len(data)})
        messages: list[Any] = []
        for begin, end in itertools.pairwise(cuts):
            piece = data[begin:end]
            prefix = self._candidate_prefix(begin, starts)
            if prefix is not None and not self._c_body_paused:
                if self._queue_max and self._c_unconsumed >= self._queue_max:
                    # The C parser may be paused holding bytes from before this
                    # piece: wait for the protocol to drain its queue (it then
                    # feeds b"", see _resume_deferred).
                    self._deferred, self._deferred_prefix = data[begin:], prefix
                    return messages, False, b""
                try:
                    got, upgraded, tail = self._feed_c(piece)
                except BadHttpMethod as exc:
                    if not self._rejected_first_line(exc, piece, prefix):
                        raise
                    got, upgraded, tail = self._switch(prefix + data[begin:])
                    return messages + got, upgraded, tail
            else:
                got, upgraded, tail = self._feed_c(piece)
            messages += got
            if upgraded:
                return messages, True, tail + data[end:]
            self._fed(piece)
        return messages, False, b""

    def _candidate_prefix(self, begin: int, starts: list[int]) -> bytes | None:
        """For a piece at ``begin`` that starts a LIST line: the line's bytes fed before it."""
        if begin in starts:
            return b""
        if begin == 0 and starts and starts[0] < 0:
            return self._recent[starts[0]:]
        return None

    @staticmethod
    def _rejected_first_line(exc: BadHttpMethod, piece: bytes, prefix: bytes) -> bool:
        """Whether llhttp rejected the ``LIST`` verb that starts ``piece``, at its ``S``.

        llhttp quotes the line around the error (from the CRLF before it) and
        points at the column. A LIST read from a message boundary fails at its
        "S" ("LI" could still be LINK), ``len(prefix)`` bytes of it fed before
        this piece. Failing anywhere else means the C parser was not at a
        boundary ("GLIST"), and a later line with the same text would make the
        quote ambiguous: both are refused (400). If aiohttp changes its message
        format this fails closed too.
        """
        if len(prefix) > 2:
            return False
        first_line = piece.split(_CRLF, 1)[0]
        if _CRLF + first_line in piece:
            return False
        before = b"LI"[len(prefix):]
        pointer = " " * (len(repr(before)) - 1) + "^"
        return exc.message.endswith(f"  {first_line!r}\n  {pointer}")

    def _switch(self, data: bytes) -> _FeedResult:
        protocol, loop, limit = self._args
        self._py = http_parser.HttpRequestParserPy(protocol, loop, limit, **self._kwargs)
        return self._py.feed_data(data)  # type: ignore[no-any-return]
