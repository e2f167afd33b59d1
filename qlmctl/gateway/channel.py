"""The local channel between the QLM core process and a relay worker (`qlmctl serve --workers N`).

A Unix stream socket pair; each frame is a 4-byte little-endian length and an orjson array of messages,
each message an array whose first item names it (see `qlmctl.gateway.workers` for the vocabulary).
Messages sent within one event-loop iteration go out as one frame, in order: a burst of arrivals or
token reports costs one write and one read. A `before_flush` hook may put messages at the head of a frame
(the relay worker's token counts, summed per request over the iteration).

The first frame from the core is the worker's configuration, pickled (the scenario and engine specs are
Python objects); every later frame is orjson.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
from collections.abc import Callable
from typing import Any

import orjson

MAX_FRAME = 1 << 30
_LEN = 4


class Channel:
    """One end of the channel: `send` messages (batched per loop iteration), `run` to deliver what arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 before_flush: Callable[[list[Any]], None] | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self._out: list[Any] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._before_flush = before_flush
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket, **kw: Any) -> "Channel":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 22)
        return cls(reader, writer, **kw)

    def send(self, msg: Any) -> None:
        """Queue `msg`; it goes out at the end of this loop iteration."""
        self._out.append(msg)
        self.schedule()

    def schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        head: list[Any] = []
        if self._before_flush is not None:
            self._before_flush(head)
        out = head + self._out if head else self._out
        self._out = []
        if not out:
            return
        data = orjson.dumps(out)
        try:
            self.writer.write(len(data).to_bytes(_LEN, "little") + data)
        except (ConnectionError, RuntimeError):
            self.closed = True

    def send_raw(self, data: bytes) -> None:
        """One frame of bytes as they are (the pickled configuration)."""
        self.writer.write(len(data).to_bytes(_LEN, "little") + data)

    async def recv_raw(self) -> bytes:
        n = int.from_bytes(await self.reader.readexactly(_LEN), "little")
        if n > MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes")
        return await self.reader.readexactly(n)

    async def run(self, deliver: Callable[[list[Any]], None]) -> None:
        """Deliver every frame's messages, in order, until the other end closes (returns) or the task is
        cancelled."""
        try:
            while True:
                try:
                    data = await self.recv_raw()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                deliver(orjson.loads(data))
        finally:
            self.closed = True

    async def drain(self) -> None:
        self.flush()
        try:
            await self.writer.drain()
        except ConnectionError:
            pass

    def close(self) -> None:
        self.flush()
        self.closed = True
        self.writer.close()


def pack_config(cfg: dict[str, Any]) -> bytes:
    return pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_config(data: bytes) -> dict[str, Any]:
    return pickle.loads(data)  # noqa: S301 - from the parent process over a private socket pair
