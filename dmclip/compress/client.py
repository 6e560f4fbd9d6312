"""The edge end of the link: ``LinkClient`` sends frames (:mod:`dmclip.compress.link`) and reads the replies."""

from __future__ import annotations

import json
import socket
import time

from dmclip.compress.link import INFO_REQUEST, LENGTH, MAX_FRAME, frame, parse_address, read_exact
from dmclip.errors import DmclipError


class LinkClient:
    """The edge side: send frames, read replies, count bytes on the wire and round-trip time."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 60.0):
        self.host, self.port = parse_address(address) if isinstance(address, str) else address
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise DmclipError(f"cannot connect to {self.host}:{self.port} ({exc.strerror or exc})",
                              "start the server first: dmclip compress serve --model ... --port P") from None

    def request(self, body: bytes) -> dict:
        """Send one frame, wait for the reply -> {"reply": dict, "rtt_seconds", "bytes_sent", "bytes_received"}."""
        start = time.perf_counter()
        try:
            try:
                self._sock.sendall(frame(body))
            except OSError:
                pass  # a server that refused us (busy) may have replied and closed already: read that reply
            head = read_exact(self._sock, LENGTH.size)
            if len(head) < LENGTH.size:
                raise DmclipError("the server closed the connection without a reply", "check the server's log")
            (length,) = LENGTH.unpack(head)
            if length > MAX_FRAME:
                raise DmclipError(f"reply of {length} bytes is larger than the limit", "is this a dmclip server?")
            reply_body = read_exact(self._sock, length)
        except OSError as exc:
            raise DmclipError(f"link to {self.host}:{self.port} failed ({exc})", "check the server is running") from None
        rtt = time.perf_counter() - start
        if len(reply_body) < length:
            raise DmclipError("the server's reply was cut short", "check the server's log")
        try:
            reply = json.loads(reply_body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DmclipError("the server's reply is not JSON", "is this a dmclip compress server?") from None
        if not isinstance(reply, dict):
            raise DmclipError("the server's reply is not a JSON object", "is this a dmclip compress server?")
        return {"reply": reply, "rtt_seconds": rtt, "bytes_sent": LENGTH.size + len(body),
                "bytes_received": LENGTH.size + length}

    def info(self) -> dict:
        """The server's info: what its model reads ("accepts") and its limits."""
        reply = self.request(INFO_REQUEST)["reply"]
        if not reply.get("ok") or not isinstance(reply.get("info"), dict):
            raise DmclipError(f"the server did not answer the info request ({reply.get('error', 'no info')})",
                              "run the same dmclip version on the edge and the server")
        return reply["info"]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
