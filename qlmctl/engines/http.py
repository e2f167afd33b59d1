"""A small asyncio HTTP/1.1 client: keep-alive connection pools and incrementally read (chunked) bodies.

Why not httpx: its connection pool checks every pooled connection on every request (a socket poll
and a peer-name lookup each), so at the hundreds of connections a gateway holds to each engine a
request costs milliseconds of CPU. Here a pool is a stack of idle connections, a request is one write,
and a streamed body is read one network read at a time, each read decoding every complete chunk it
holds (so the events of one engine write arrive together). Plain http:// only.

A connection goes back to its pool only after its response was read to the end; a response left
early (an eviction, a client gone) closes its connection, which is how vLLM learns to abort.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

READ_SIZE = 1 << 16
HEAD_LIMIT = 1 << 16
WRITE_SLICE = 1 << 18
"""A request body larger than this is written in slices of it, each after the last has (mostly) left: the
transport's buffer never holds a copy of a large body."""


class _Timeout:
    """`asyncio.timeout` for Python 3.10: a cancel scope whose deadline can move (`reschedule`)."""

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._handle: asyncio.Handle | None = None
        self._task: asyncio.Task | None = None
        self._fired = False

    async def __aenter__(self) -> "_Timeout":
        self._task = asyncio.current_task()
        if self._delay is not None:
            self.reschedule(asyncio.get_running_loop().time() + self._delay)
        return self

    def reschedule(self, when: float | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if when is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_soon(self._fire) if when <= loop.time() else loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._fired = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._fired and et is asyncio.CancelledError:
            raise TimeoutError from e


def timeout(delay: float | None) -> Any:
    """A cancel scope that raises TimeoutError at its deadline or when `reschedule`d to the past."""
    if sys.version_info >= (3, 11):
        return asyncio.timeout(delay)
    return _Timeout(delay)


class HTTPError(ConnectionError):
    """The connection failed, or the server broke the HTTP framing."""


class ConnectError(HTTPError):
    """The connection could not be made (refused, unreachable, or the connect timed out)."""


class LocalResourceError(HTTPError):
    """This process ran out of a resource making the connection (file descriptors, buffers, memory): the
    server is not at fault."""


LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""errno values that mean "this process or machine is out of resources", not "the peer failed"."""


class Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not self.writer.transport.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.transport.abort()  # no lingering: the peer sees the close at once


class Response:
    """A response whose body has not been read yet. Read it with `read()` or `chunks()`, or `close()` it."""

    __slots__ = ("status", "headers", "_conn", "_pool", "_chunked", "_length", "_keep", "_done")

    def __init__(self, status: int, headers: dict[str, str], conn: Connection, pool: "Pool") -> None:
        self.status = status
        self.headers = headers
        self._conn: Connection | None = conn
        self._pool = pool
        self._chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        length = headers.get("content-length")
        self._length = int(length) if length is not None and not self._chunked else None
        self._keep = headers.get("connection", "").lower() != "close"
        self._done = False

    async def read(self) -> bytes:
        if self._length is not None:
            conn = self._conn
            assert conn is not None
            try:
                data = await conn.reader.readexactly(self._length) if self._length else b""
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                self.close()
                raise HTTPError(f"connection lost while reading the body: {e}") from None
            self._finish()
            return data
        return b"".join([part async for part in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: per network read, the payload of the complete chunks it completed."""
        conn = self._conn
        assert conn is not None
        if not self._chunked:
            if self._length is not None:
                yield await self.read()
                return
            # Neither chunked nor sized: the body runs to the end of the connection.
            self._keep = False
            while data := await conn.reader.read(READ_SIZE):
                yield data
            self._finish()
            return
        reader = conn.reader
        buf = b""
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise HTTPError("connection closed in the middle of a chunked body")
                buf = buf + data if buf else data
                parts, pos, done = _dechunk(buf)
                buf = buf[pos:]
                if parts:
                    yield parts[0] if len(parts) == 1 else b"".join(parts)
                if done:
                    self._finish()
                    return
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            self.close()
            if isinstance(e, HTTPError):
                raise
            raise HTTPError(f"connection lost while reading the body: {e}") from None
        finally:
            if not self._done:
                self.close()  # left early (cancelled, or the caller stopped): the connection cannot be reused

    def _finish(self) -> None:
        self._done = True
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, self._keep)

    def close(self) -> None:
        """Drop the response; unless it was read to the end, its connection is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._done:
                self._pool._release(conn, self._keep)
            else:
                conn.close()


def _dechunk(buf: bytes) -> tuple[list[bytes], int, bool]:
    """Decode the complete chunks at the start of `buf`: (payloads, bytes used, terminal chunk seen)."""
    parts: list[bytes] = []
    pos = 0
    n = len(buf)
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return parts, pos, False
        try:
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            raise HTTPError(f"bad chunk size line {buf[pos:eol][:40]!r}") from None
        if size == 0:
            if buf.startswith(b"\r\n", eol + 2):
                return parts, eol + 4, True
            end = buf.find(b"\r\n\r\n", eol)  # trailers
            return (parts, end + 4, True) if end >= 0 else (parts, pos, False)
        end = eol + 2 + size
        if n < end + 2:
            return parts, pos, False
        parts.append(buf[eol + 2:end])
        pos = end + 2


class Pool:
    """Keep-alive connections to one http://host:port."""

    def __init__(self, url: str, max_idle: int = 1024, connect_timeout_s: float = 5.0) -> None:
        u = urlparse(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"only http://host[:port] URLs are supported, got '{url}'")
        self.host = u.hostname
        self.port = u.port or 80
        self.base_path = u.path.rstrip("/")
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[Connection] = []
        self._host_header = f"{self.host}:{self.port}".encode()
        self._closed = False

    async def _connect(self) -> Connection:
        try:
            async with timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=HEAD_LIMIT)
        except (OSError, TimeoutError) as e:
            if isinstance(e, OSError) and e.errno in LOCAL_ERRNOS:
                raise LocalResourceError(f"cannot connect to {self.host}:{self.port}: {e}") from None
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {e or type(e).__name__}") from None
        return Connection(reader, writer)

    def _release(self, conn: Connection, keep: bool) -> None:
        if keep and not self._closed and len(self._idle) < self.max_idle and conn.usable:
            self._idle.append(conn)
        else:
            conn.close()

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: list[tuple[str, str]] | None = None) -> Response:
        """Send a request and read the status line and headers; the body is the caller's to read or close."""
        head = [f"{method} {self.base_path}{path} HTTP/1.1\r\nhost: ".encode(), self._host_header, b"\r\n"]
        for k, v in headers or ():
            head.append(f"{k}: {v}\r\n".encode("latin-1"))
        if body is not None:
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        large = body is not None and len(body) > WRITE_SLICE
        data = b"".join(head) + (body or b"") if not large else b"".join(head)
        for attempt in (0, 1):
            conn = None
            while self._idle:
                c = self._idle.pop()
                if c.usable:
                    conn = c
                    break
                c.close()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                conn.writer.write(data)
                if large:
                    view = memoryview(body)  # type: ignore[arg-type]
                    for start in range(0, len(view), WRITE_SLICE):
                        await conn.writer.drain()
                        conn.writer.write(view[start:start + WRITE_SLICE])
                if conn.writer.transport.get_write_buffer_size() > READ_SIZE:
                    await conn.writer.drain()
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: retry on a fresh one
                raise HTTPError(f"{method} {path}: connection lost before the response: {e}") from None
            except asyncio.LimitOverrunError:
                conn.close()
                raise HTTPError(f"{method} {path}: response headers too long") from None
            except BaseException:
                conn.close()
                raise
            return _parse_head(raw, conn, self)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        for c in self._idle:
            c.close()
        self._idle.clear()


def _parse_head(raw: bytes, conn: Connection, pool: Pool) -> Response:
    lines = raw.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        conn.close()
        raise HTTPError(f"bad status line {lines[0][:80]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return Response(status, headers, conn, pool)


async def sse_data(resp: Response) -> AsyncIterator[list[bytes]]:
    """The data payloads of a server-sent-event body, one list per network chunk that completed events.

    Events end with a blank line; an event's `data:` lines are joined (vLLM sends one per event, the fast
    path); comments and keep-alives carry no data and are skipped. Lines may end with CRLF or CR as well
    as LF (the SSE spec allows all three).
    """
    buf = b""
    async for chunk in resp.chunks():
        buf = buf + chunk if buf else chunk
        if b"\r" in buf:  # not vLLM's framing: normalise, keeping a trailing CR whose LF may come next
            cr = buf.endswith(b"\r")
            buf = buf[:-1] if cr else buf
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if cr else b"")
        end = buf.rfind(b"\n\n")
        if end < 0:
            continue
        whole, buf = buf[:end], buf[end + 2:]
        payloads = []
        for block in whole.split(b"\n\n"):
            if block.startswith(b"data: ") and b"\n" not in block:
                payloads.append(block[6:])
            else:
                data = _data_of(block)
                if data is not None:
                    payloads.append(data)
        if payloads:
            yield payloads


def _data_of(block: bytes) -> bytes | None:
    """The data of one server-sent event (its `data:` lines joined), None when it has none."""
    lines = [ln[5:].removeprefix(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
