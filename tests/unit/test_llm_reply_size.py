"""A provider that answers with a huge body: the client stops reading past MAX_REPLY_BYTES (a reply)
or ERROR_BODY_MAX (an error, whose body the SDK reads for its message).

The server streams its body lazily (nothing big is held on either side) and counts what it managed
to send before the client hung up: an unbounded read would take all of it into the worker's memory.
"""

from __future__ import annotations

import re
import socket
import threading
from typing import Any

import pytest

from briefs import llm
from briefs.llm import LLMClient, LLMError, ProjectBrief
from briefs.settings import Settings

BODY = 512 * 2**20  # what the server offers: 512 MiB
CHUNK = b" " * 2**16  # JSON whitespace, so the body is even valid-looking up to its end


class EndlessReplyServer:
    """HTTP/1.1 on a socket: one request gets ``status`` with a body of BODY bytes of whitespace."""

    def __init__(self, status: str = "200 OK", body: bytes | None = None) -> None:
        self.status = status
        self.body = body  # a fixed body instead of BODY bytes of whitespace
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _serve(self) -> None:  # one connection: the client makes one request (no retries)
        self.sock.settimeout(30)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head_end = data.index(b"\r\n\r\n") + 4
                length = re.search(rb"(?i)content-length:\s*(\d+)", data[:head_end])
                while length and len(data) - head_end < int(length[1]):  # the whole request: no reset on close
                    data += conn.recv(65536)
                size = BODY if self.body is None else len(self.body)
                head = f"HTTP/1.1 {self.status}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
                conn.sendall(head.encode())
                if self.body is not None:
                    conn.sendall(self.body)
                    return
                while self.sent < BODY:
                    conn.sendall(CHUNK)
                    self.sent += len(CHUNK)
            except OSError:
                pass  # the client hung up: what we measure

    def __enter__(self) -> EndlessReplyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self.thread.join(timeout=30)


def make_client(server: EndlessReplyServer) -> LLMClient:
    values: dict[str, Any] = {"openai_api_key": "test-key", "openai_base_url": server.base_url,
                              "llm_max_retries": 0, "llm_timeout": 30.0, "llm_rpm": 0}
    return LLMClient(Settings(_env_file=None, **values))  # type: ignore[call-arg]


async def test_a_huge_reply_is_cut_after_max_reply_bytes_not_read_whole() -> None:
    with EndlessReplyServer() as server:
        async with make_client(server) as client:
            with pytest.raises(LLMError) as caught:
                await client.complete([{"role": "user", "content": "Project: P"}], ProjectBrief)
    assert caught.value.kind == "malformed" and "response body too large" in str(caught.value)
    # What the server got out before the client hung up: the cap plus what the sockets buffer
    # (a few MiB on loopback), far from the whole body.
    assert server.sent < llm.MAX_REPLY_BYTES + 64 * 2**20 < BODY


@pytest.mark.parametrize(("status", "kind"), [("500 Internal Server Error", "server"), ("400 Bad Request", "rejected"),
                                              ("429 Too Many Requests", "rate_limit")])
async def test_a_huge_error_body_is_cut_and_the_error_still_classified(status: str, kind: str) -> None:
    with EndlessReplyServer(status) as server:
        async with make_client(server) as client:
            with pytest.raises(LLMError) as caught:
                await client.complete([{"role": "user", "content": "Project: P"}], ProjectBrief)
    assert caught.value.kind == kind and caught.value.status == int(status[:3])
    assert server.sent < 64 * 2**10 + 64 * 2**20 < BODY  # ERROR_BODY_MAX (64 KiB) plus socket buffers


async def test_an_envelope_nested_too_deep_for_json_is_a_malformed_reply() -> None:
    with EndlessReplyServer(body=b"[" * 200_000 + b"]" * 200_000) as server:
        async with make_client(server) as client:
            with pytest.raises(LLMError) as caught:
                await client.complete([{"role": "user", "content": "Project: P"}], ProjectBrief)
    assert caught.value.kind == "malformed" and "RecursionError" in str(caught.value)
