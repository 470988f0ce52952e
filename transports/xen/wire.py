"""Framing of the emulated-xenstore socket: length-prefixed JSON objects, fds riding along.

A frame is `u32 length (LE) + JSON object`; file descriptors that belong to a frame are sent with
SCM_RIGHTS in the same `sendmsg` as its first byte, and the frame says how many with `"nfds"`.
The reader keeps its partial buffer and received fds in the object, so a cancelled read loses
nothing. This module must never interpret the objects it frames.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from collections import deque
from typing import Any

import trio

MAX_FRAME = 1 << 20
MAX_FDS = 8


class WireError(Exception):
    """The peer broke the framing."""


class FrameSocket:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._send_lock = trio.Lock()
        self.closed = False

    async def send(self, obj: dict[str, Any], fds: list[int] | None = None) -> None:
        fds = fds or []
        obj = dict(obj, nfds=len(fds))
        data = json.dumps(obj, separators=(",", ":")).encode()
        frame = struct.pack("<I", len(data)) + data
        async with self._send_lock:
            anc = []
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await self.sock.sendmsg([frame], anc)
            view = memoryview(frame)[sent:]
            while view:
                n = await self.sock.send(view)
                view = view[n:]

    def _parse(self) -> tuple[dict[str, Any], list[int]] | None:
        if len(self._buf) < 4:
            return None
        (length,) = struct.unpack_from("<I", self._buf)
        if length > MAX_FRAME:
            raise WireError(f"frame of {length} bytes")
        if len(self._buf) < 4 + length:
            return None
        raw = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise WireError(f"bad frame: {e}") from None
        if not isinstance(obj, dict):
            raise WireError("frame is not an object")
        nfds = obj.get("nfds", 0)
        if not isinstance(nfds, int) or nfds < 0 or nfds > MAX_FDS or nfds > len(self._fds):
            raise WireError(f"frame claims {nfds!r} fds, {len(self._fds)} received")
        fds = [self._fds.popleft() for _ in range(nfds)]
        return obj, fds

    async def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next frame and its fds (the caller owns them). Raises EOFError on close."""
        while True:
            got = self._parse()
            if got is not None:
                return got
            data, anc, _flags, _addr = await self.sock.recvmsg(
                65536, socket.CMSG_SPACE(MAX_FDS * 4)
            )
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % 4])
                    self._fds.extend(arr)
            if not data:
                raise EOFError("peer closed")
            self._buf += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            while self._fds:
                os.close(self._fds.popleft())
            self.sock.close()
