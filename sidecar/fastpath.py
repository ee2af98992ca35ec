"""The main listener's fast path for the decision endpoint: a plain, bodyless HTTP/1.1 request
for `/_sidecar/auth` is parsed with httptools and answered by the route's own handler, its
response written in one `write`; at anything else the connection is handed, with every byte
it sent, to aiohttp's RequestHandler, which owns it from then on.

Why: on a cached token, aiohttp's per-request machinery (its protocol task, request and
response objects, `prepare`, the writer) cost twice the decision itself. A decision needs none
of it: no body, no streaming, one small response.

Rules that hold here:
1. Only what is plainly a bodyless HTTP/1.1 request head is answered here. Exactly one head
   (up to its first CRLF CRLF) is given to the parser at a time, so where one request ends is
   never a guess. The head must be at most `MAX_HEAD` bytes and `MAX_FIELDS` fields (within
   aiohttp's own line and field limits), every line must end in CRLF, no line may be folded,
   it must have one Host and no second copy of a field aiohttp allows once, and it may carry
   no Content-Length, Transfer-Encoding, Upgrade or Expect. Values lose their trailing
   spaces and tabs, as in aiohttp. The method must
   not be HEAD or CONNECT, and the target must be plain characters under `/_sidecar/auth`
   (no `%`, `//`, `/.`, `#`). Anything else, a parser error included, is aiohttp's: the
   connection is handed over before any byte of that request is answered, so every framing,
   limit and malformed-request rule of `sidecar.server` applies to it unchanged.
2. The handler is the route's own (`Gate.handler(decision_handler)`), called in a task of
   its own with a real `web.Request`: the decision, metrics, errors and access line are those
   of the aiohttp path. Its response is serialised as aiohttp serialises a `web.Response`
   (Content-Length, Content-Type for a body, Date, Server, `Connection: close` when closing).
3. A connection's requests are answered in order, one at a time. Bytes that arrive meanwhile
   wait; past `MAX_WAITING` bytes, reading pauses. One difference from aiohttp remains, by
   design: a request answered here is answered even when the bytes after it are malformed or
   the client half-closes (aiohttp, reading ahead, drops it).
4. The bounds of `sidecar.server` hold here too: the connection cap counts these connections,
   a head must be complete within the header timeout (from the connection's start or the
   first byte of a later request), an idle connection is closed after the keep-alive timeout,
   and an unfinished head over `MAX_HEAD` goes to aiohttp, which answers 431 beyond
   `max_header_bytes`. After a hand-over aiohttp's own deadlines start over, so a head has at
   most twice the header timeout.
5. Shutdown: idle connections are closed at once. A request being answered finishes within
   the grace, with `Connection: close`; past it, its task is cancelled and the connection
   closed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.gate import Handler

if TYPE_CHECKING:
    from sidecar.logs import AccessLog
    from sidecar.server import ConnectionLimits

log = logging.getLogger("sidecar.fastpath")

MAX_HEAD = 8190  # aiohttp's max_line_size and max_field_size: no line of ours can exceed them
MAX_FIELDS = 128  # aiohttp's max_headers
MAX_WAITING = 64 * 1024  # bytes of later requests held while one is answered
# The decision endpoint and its `/...` tail, in plain characters only, and an optional query.
_TARGET_RE = re.compile(rb"/_sidecar/auth(?:/[A-Za-z0-9_~!$&'()*+,;=:@./-]*)?(?:\?[^#]*)?")
_REFUSED_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect",
                             b"sec-websocket-key1"})
# Fields aiohttp refuses to see twice (its SINGLETON_HEADERS); Host must be there once.
_SINGLE_FIELDS = frozenset({b"content-location", b"content-range", b"content-type", b"etag",
                            b"host", b"max-forwards", b"server", b"user-agent"})
_OWS = b" \t"
_REFUSED_METHODS = frozenset({b"HEAD", b"CONNECT"})
_HEAD_END = b"\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})


class _NoWriter(AbstractStreamWriter):
    """The `payload_writer` of a fast-path request: its response is serialised by
    `FastConnection`, never prepared through a writer, so every use is a bug."""

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("a fast-path response cannot be streamed")

    write = write_eof = drain = write_headers = _refuse
    enable_compression = enable_chunking = send_headers = _refuse


_NO_WRITER = _NoWriter()


class FastPath:
    """One listener's fast path: the handler, what its connections share, and the live ones."""

    def __init__(self, handler: Handler, *, limits: ConnectionLimits,
                 access_log: AccessLog | None, handoff: Callable[[], asyncio.Protocol],
                 open_connections: Callable[[], int], client_max_size: int = 1024**2) -> None:
        self.handler = handler
        self.limits = limits
        self.access_log = access_log
        # A new aiohttp RequestHandler for a connection handed over (rule 1).
        self.handoff = handoff
        # The listener's open connections, these and aiohttp's (rule 4: the cap).
        self.open_connections = open_connections
        self.client_max_size = client_max_size
        # An unfinished head longer than this goes to aiohttp, which applies its own limits
        # (sidecar.server rule 4: 431 beyond max_header_bytes).
        self.max_unfinished = min(MAX_HEAD, limits.max_header_bytes)
        self.connections: set[FastConnection] = set()
        # Requests being answered, also those whose client has gone (rule 5 waits for them).
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.answered = 0  # requests answered here, not by aiohttp (for tests and debugging)

    def __call__(self) -> FastConnection:
        return FastConnection(self)

    def close_idle(self) -> None:
        """Rule 5, first step: no new request is started; idle connections close now."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()

    async def shutdown(self, grace: float | None) -> None:
        """Rule 5: wait for requests being answered, then cancel what is left."""
        self.close_idle()
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.abort_unless_closing()


class FastConnection(asyncio.Protocol):
    """One client connection while the fast path owns it."""

    # What web.Request reads of its protocol.
    ssl_context = None
    peername: Any = None
    sockname: Any = None

    def __init__(self, fast: FastPath) -> None:
        self._fast = fast
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._buffer = bytearray()  # bytes received and not yet answered or handed over
        self.task: asyncio.Task[None] | None = None
        self._paused = False
        self._eof = False
        self._refused = False
        self._handed_off = False
        # Rule 4: one timer; it re-arms itself when the deadline moved since it was set, and
        # does nothing while a request is answered.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The head being parsed.
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._keep_alive = False
        self._plain = False
        self._method = b""

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        fast = self._fast
        limits = fast.limits
        transport = cast(asyncio.Transport, base)  # uvloop's is not an asyncio.Transport
        if fast.open_connections() >= limits.max_connections:
            self._refused = True
            limits.refused()
            transport.abort()  # RST, as sidecar.server rule 6
            return
        self.transport = transport
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        fast.connections.add(self)
        self._set_deadline(limits.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused or self._handed_off:
            return
        self._fast.connections.discard(self)
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A task being answered runs to its end (aiohttp does not cancel handlers either);
        # its response is dropped and its access line still written.

    def data_received(self, data: bytes) -> None:
        starting = not self._buffer
        self._buffer += data
        if self.task is not None:
            if len(self._buffer) > MAX_WAITING and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
            return
        self._next()
        if starting and self._buffer and self.task is None and not self._handed_off:
            # The first bytes of a head that is not whole yet: it has the header timeout
            # from now. (A whole head, the usual case, needs no timer at all.)
            self._set_deadline(self._fast.limits.header_timeout)

    def eof_received(self) -> bool | None:
        self._eof = True
        if self.task is None:
            # Idle, or an unfinished head that can no longer finish: the transport closes.
            return None
        return True  # answer the request being answered; `_next` closes after it

    # --- httptools callbacks -----------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        # Read here: once the message is complete, llhttp starts over for the next one.
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()
        self._plain = parser.get_http_version() == "1.1" and not parser.should_upgrade()
        self._method = parser.get_method()

    def on_message_complete(self) -> None:
        self._complete = True

    # --- the requests --------------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the next whole head in the buffer, or hand the connection over."""
        transport = self.transport
        if transport is None or self.task is not None:
            return
        buffer = self._buffer
        if self._fast.closing or (self._eof and not buffer):
            # Shutting down, no next request is started (as aiohttp's close()); or the client
            # is done.
            transport.close()
            return
        if not buffer:
            return
        end = buffer.find(_HEAD_END)
        if end < 0:
            # Over MAX_HEAD: aiohttp answers 431 once it is over max_header_bytes. A bare LF:
            # a head that may end without CRLF CRLF, aiohttp's to judge.
            if (len(buffer) > self._fast.max_unfinished
                    or buffer.count(b"\n") != buffer.count(b"\r\n")):
                self._hand_off()
            elif self._eof:
                transport.close()  # a head that can no longer finish
            return
        head = bytes(buffer[:end + 4])
        message = self._parse(head)
        if message is None:
            self._hand_off()
            return
        del buffer[:end + 4]
        task = self.task = self._loop.create_task(self._answer(message))
        self._fast.tasks.add(task)
        task.add_done_callback(self._fast.tasks.discard)

    def _parse(self, head: bytes) -> RawRequestMessage | None:
        """The head as aiohttp would have parsed it, or None if it is not for this path."""
        # Lines end in CRLF only (no bare CR or LF), and none is folded.
        bare = head.replace(b"\r\n", b"")
        if (len(head) > MAX_HEAD or b"\r" in bare or b"\n" in bare
                or b"\n " in head or b"\n\t" in head):
            return None
        self._url = b""
        self._fields = []
        self._complete = self._plain = False
        try:
            self._parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        fields = self._fields
        target = self._url
        if (not self._complete or not self._plain or self._method in _REFUSED_METHODS
                or len(fields) > MAX_FIELDS or not _TARGET_RE.fullmatch(target)):
            return None
        path = target.decode("ascii")
        raw_path, _, query = path.partition("?")
        if "//" in raw_path or "/." in raw_path:
            return None  # the router would read a normalised path: aiohttp's case
        headers: CIMultiDict[str] = CIMultiDict()
        raw: list[tuple[bytes, bytes]] = []
        single: set[bytes] = set()
        for name, value in fields:
            lower = name.lower()
            if lower in _REFUSED_FIELDS:
                return None
            if lower in _SINGLE_FIELDS:
                if lower in single:
                    return None  # aiohttp answers 400
                single.add(lower)
            value = value.rstrip(_OWS)  # as aiohttp (llhttp drops the leading OWS)
            raw.append((name, value))
            headers.add(name.decode("utf-8", "surrogateescape"),
                        value.decode("utf-8", "surrogateescape"))
        if b"host" not in single:
            return None  # aiohttp answers 400 to an HTTP/1.1 request without Host
        url = URL.build(path=raw_path, query_string=query, encoded=True)
        return RawRequestMessage(
            self._method.decode("ascii"), path, HttpVersion11, CIMultiDictProxy(headers),
            tuple(raw), not self._keep_alive, None, False, False, url)

    async def _answer(self, message: RawRequestMessage) -> None:
        fast = self._fast
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        request = web.Request(message, EMPTY_PAYLOAD, cast(Any, self), _NO_WRITER, task,
                              self._loop, client_max_size=fast.client_max_size)
        keep_alive = not message.should_close
        try:
            response = await fast.handler(request)
            data, keep_alive = _serialise(response, keep_alive and not fast.closing)
        except asyncio.CancelledError:  # shutdown past the grace
            self.task = None
            self.abort()
            raise
        except Exception:
            # As aiohttp's handle_error: a handler that raised past the error table is a bug.
            log.exception("unhandled error on the decision fast path")
            response = web.Response(status=500, text="500 Internal Server Error")
            data, keep_alive = _serialise(response, False)
        fast.answered += 1
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
        self.task = None
        if fast.access_log is not None:
            try:
                fast.access_log.log(request, response, time.perf_counter() - started)
            except Exception:  # as aiohttp's log_access: never the connection's problem
                log.exception("access line not written")
        if transport is None:
            return
        if not keep_alive:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self._next()
        if self.task is None and not self._handed_off:
            # Waiting: for the rest of a head begun meanwhile, or for a next request.
            self._set_deadline(self._fast.limits.header_timeout if self._buffer
                               else self._fast.limits.keepalive_timeout)

    # --- handing over, closing, deadlines --------------------------------------------------

    def _hand_off(self) -> None:
        """Rule 1: aiohttp takes the connection and every byte not yet answered."""
        transport = self.transport
        assert transport is not None
        assert self.task is None
        self._handed_off = True
        self._fast.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        handler = self._fast.handoff()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            self._paused = False
            transport.resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            handler.data_received(data)
        if self._eof and not handler.eof_received():
            transport.close()  # what asyncio does when eof_received says so

    def close_when_idle(self) -> None:
        if self.task is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def abort_unless_closing(self) -> None:
        # A connection closing already may still be sending its last response.
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _set_deadline(self, seconds: float) -> None:
        deadline = self._deadline = self._loop.time() + seconds
        # A later deadline is left to the armed timer, which re-arms itself when it fires;
        # an earlier one needs a timer of its own.
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(deadline)

    def _arm(self, at: float) -> None:
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self.task is not None:
            return  # closed, or a request is being answered
        now = self._loop.time()
        if now < self._deadline:
            self._arm(self._deadline)
            return
        self.transport.close()  # sidecar.server rule 3, or the keep-alive timeout


def _serialise(response: web.StreamResponse, keep_alive: bool) -> tuple[bytes, bool]:
    """The bytes aiohttp would write for `response` (an unprepared `web.Response` with a
    bytes body or none), and whether the connection stays open after it."""
    if not isinstance(response, web.Response) or response.prepared:
        raise RuntimeError("the decision fast path answers with a plain web.Response")
    body = response.body
    if body is None:
        body = b""
    elif not isinstance(body, bytes):
        raise RuntimeError("the decision fast path answers with a bytes body")
    if response.keep_alive is False:
        keep_alive = False
    status = response.status
    headers = response.headers
    if "Content-Length" in headers:
        del headers["Content-Length"]  # set below, from the body
    lines = [f"HTTP/1.1 {status} {response.reason}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if status in _NO_BODY_STATUS or status < 200:
        body = b""
    else:
        lines.append(f"Content-Length: {len(body)}")
        if body and "Content-Type" not in headers:
            lines.append("Content-Type: application/octet-stream")
    if "Date" not in headers:
        lines.append(f"Date: {rfc822_formatted_time()}")
    if "Server" not in headers:
        lines.append(f"Server: {SERVER_SOFTWARE}")
    if not keep_alive and "Connection" not in headers:
        lines.append("Connection: close")
    fields = "".join(lines[1:])  # every name and value, nothing between them
    if "\n" in fields or "\r" in fields:
        # aiohttp refuses such a header too: a value must never split the response.
        raise ValueError("newline in a response header")
    lines.append("\r\n")
    return "\r\n".join(lines).encode() + body, keep_alive

