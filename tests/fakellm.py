"""A small OpenAI-compatible chat-completions server for tests.

It runs a stdlib ``ThreadingHTTPServer`` in a background thread, so it works
whatever event loop (or none) the test uses, and the real ``openai`` SDK can
talk HTTP to it::

    with FakeLLM() as fake:
        fake.script(Fault.status(429, retry_after=0.2), Fault.truncated())
        settings = Settings(openai_api_key="test-key", openai_base_url=fake.base_url)
        ...
        assert fake.calls == 3

How a request is answered, first match wins:

1. a persistent rule added with :meth:`FakeLLM.fail_when` whose predicate matches the body;
2. the next scripted fault queued with :meth:`FakeLLM.script` (consumed one per request);
3. a normal reply whose content comes from ``responder`` (default: :func:`default_responder`).

``latency`` is slept before every answer, faults included.

A provider's rate limit, off by default, is checked before all three (after the API key):
:meth:`FakeLLM.rate_limit` sets requests per minute (and optionally tokens per minute) as token
buckets refilled continuously, like the provider's. A request that finds its bucket empty is
answered at once, without ``latency``, with a 429 ``rate_limit_exceeded`` that says how long to
wait (``Retry-After`` in whole seconds, ``retry-after-ms`` exactly), and is counted in
:attr:`FakeLLM.refused`; it is one of :attr:`FakeLLM.calls` too (every HTTP request is)::

    fake.rate_limit(120, burst=2)      # 2 requests at once, then one every 0.5 s
    fake.rate_limit(None)              # unlimited again
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeLLM", "Fault", "RateBucket", "count_tokens", "default_responder"]

SCHEMA_NAME_RE = re.compile(r"schema name:\s*([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)
PROJECT_RE = re.compile(r"^\s*Project:\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Fault:
    """One way of misbehaving. Build with the class methods."""

    kind: str
    status_code: int = 200
    retry_after: float | str | None = None
    retry_after_ms: float | None = None
    seconds: float = 0.0
    text: str = ""
    error_code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def status(
        cls,
        code: int,
        *,
        retry_after: float | str | None = None,
        retry_after_ms: float | None = None,
        message: str | None = None,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """An HTTP error with an OpenAI-style ``{"error": {...}}`` body.

        ``retry_after`` is sent as ``Retry-After`` (a number of seconds, or a string
        such as an HTTP date, sent verbatim); ``retry_after_ms`` as ``retry-after-ms``.
        ``error_code`` becomes ``error.code`` in the body (e.g. ``"insufficient_quota"`` with 429).
        """
        return cls(
            "status",
            status_code=code,
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            text=message or "",
            error_code=error_code,
            headers=dict(headers or {}),
        )

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Sleep ``seconds`` (on top of ``latency``), then answer normally."""
        return cls("delay", seconds=seconds)

    @classmethod
    def truncated(cls) -> Fault:
        """A 200 ``application/json`` response whose body is cut off half-way.

        ``Content-Length`` matches the bytes sent, so the HTTP exchange itself is
        fine and only the JSON is broken.
        """
        return cls("truncated")

    @classmethod
    def trickle(cls, seconds: float, status: int = 200) -> Fault:
        """Send the headers of a normal reply (or of an error ``status``), then its body one byte every
        ``seconds``: each read is quick, the whole never arrives in time."""
        return cls("trickle", status_code=status, seconds=seconds)

    @classmethod
    def disconnect(cls) -> Fault:
        """Close the connection without sending any response."""
        return cls("disconnect")

    @classmethod
    def content(cls, text: str) -> Fault:
        """A valid chat.completion envelope whose message content is ``text``."""
        return cls("content", text=text)

    @classmethod
    def schema_breaking(cls) -> Fault:
        """Valid JSON content that matches neither ``ProjectBrief`` nor ``ExecutiveSummary``."""
        return cls("content", text=json.dumps({"summary": 42, "highlights": "not a list", "risks": {}}))


def count_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: whitespace-separated words."""
    return len(text.split())


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def default_responder(body: dict[str, Any]) -> str:
    """A deterministic, schema-valid JSON reply derived from the request.

    The schema is found as ``schema name: <Name>`` in the last system message
    (falling back to any message). ``ProjectBrief`` echoes the name after
    ``Project:`` in the prompt; ``ExecutiveSummary`` lists every project named.
    Anything else gets ``{"text": "ok"}``.
    """
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    systems = [_message_text(m) for m in messages if m.get("role") in ("system", "developer")]
    everything = "\n".join(_message_text(m) for m in messages)
    match = SCHEMA_NAME_RE.search(systems[-1]) if systems else None
    match = match or SCHEMA_NAME_RE.search(everything)
    schema = match.group(1) if match else ""
    users = [_message_text(m) for m in messages if m.get("role") == "user"]
    prompt = users[-1] if users else everything
    projects = PROJECT_RE.findall(prompt) or PROJECT_RE.findall(everything)

    if schema == "ProjectBrief":
        name = projects[0] if projects else "Unnamed project"
        return json.dumps(
            {
                "summary": f"{name}: steady progress since the last brief.",
                "highlights": [f"{name} shipped its latest milestone"],
                "risks": [f"{name} has open items without an owner"],
                "next_steps": [f"Review {name} priorities"],
            }
        )
    if schema == "ExecutiveSummary":
        names = projects or ["all projects"]
        return json.dumps(
            {
                "summary": "Overview of " + ", ".join(names) + ".",
                "priority_actions": [f"Follow up on {n}" for n in names[:10]],
            }
        )
    return json.dumps({"text": "ok"})


def _error_body(message: str, error_type: str = "invalid_request_error", code: str | None = None) -> bytes:
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


class RateBucket:
    """A provider's limit: ``capacity`` tokens, refilled continuously at ``rate`` tokens per second.

    Not thread-safe by itself: :class:`FakeLLM` calls it under its lock. A request needs one whole
    token; :meth:`debit` may leave the bucket in debt (tokens per minute are counted after the reply,
    so one long reply can overdraw it), and then nothing passes until the debt is refilled.
    """

    def __init__(self, per_minute: float, capacity: float | None = None) -> None:
        if not per_minute > 0 or not math.isfinite(per_minute):
            raise ValueError(f"a rate limit must be a positive number per minute, got {per_minute!r}")
        self.rate = per_minute / 60.0
        # The provider's default burst: one second's worth, but never less than one request.
        self.capacity = max(1.0, float(capacity if capacity is not None else self.rate))
        self.per_minute = per_minute
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a whole token is there (0: there is one now). Takes nothing."""
        self._refill(now)
        missing = 1.0 - self.tokens
        return 0.0 if missing <= 1e-9 else missing / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount

    def debit(self, amount: float, now: float) -> None:
        """Spend ``amount`` after the fact; the bucket may go into debt."""
        self.take(amount, now)

    def refill(self) -> None:
        self.tokens, self.updated = self.capacity, time.monotonic()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # bursts of 100+ new connections must not be dropped
    fake: FakeLLM


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # or each reply waits ~40 ms for the client's delayed ACK
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
        pass

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            # The client gave up (e.g. its timeout fired) before we answered.
            self.close_connection = True

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, json.dumps({"object": "list", "data": []}).encode())
        else:
            self._send(404, _error_body("not found"))

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, _error_body(f"no route {path}"))
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send(400, _error_body("body is not JSON"))
            return
        fake._handle(self, body)


class FakeLLM:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint on 127.0.0.1 for tests."""

    def __init__(self, *, model: str = "fake-model") -> None:
        self.model = model
        self.latency: float = 0.0
        self.responder: Callable[[dict[str, Any]], str] | None = None
        self.expected_key: str | None = None  # if set, other bearer tokens get 401
        self.usage: dict[str, Any] | None = None  # if set, every reply's "usage" object instead of the counted one
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # request headers, parallel to ``requests``
        self.max_in_flight = 0
        self._in_flight = 0
        self._requests_limit: RateBucket | None = None
        self._tokens_limit: RateBucket | None = None
        self._refused = 0
        self._faults: deque[Fault] = deque()
        self._rules: list[tuple[Callable[[dict[str, Any]], bool], Fault]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeLLM:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        host, port = server.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="FakeLLM", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wake handlers sleeping in latency/delay
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -----------------------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """Queue faults, consumed one per request in order, before normal replies resume."""
        with self._lock:
            self._faults.extend(faults)

    def fail_when(self, predicate: Callable[[dict[str, Any]], bool], fault: Fault) -> None:
        """Every request whose body matches ``predicate`` gets ``fault`` (checked before the script)."""
        with self._lock:
            self._rules.append((predicate, fault))

    def rate_limit(self, rpm: float | None, *, burst: float | None = None, tpm: float | None = None,
                   token_burst: float | None = None) -> None:
        """Limit requests (and optionally tokens) per minute, as the provider does; ``rpm`` None or <= 0 (and
        ``tpm`` None or <= 0) turns that limit off.

        Each limit is a token bucket refilled continuously at ``per minute / 60`` per second, holding at most
        ``burst`` requests (``token_burst`` tokens), by default one second's worth and at least 1, and full
        when set. A request takes one request token when it arrives. Tokens per minute are debited after
        the reply by the reply's counted ``usage`` (prompt and completion, the model's whole cost); a
        request arriving while that bucket holds less than one token is refused as well.
        """
        with self._lock:
            self._requests_limit = RateBucket(rpm, burst) if rpm is not None and rpm > 0 else None
            self._tokens_limit = RateBucket(tpm, token_burst) if tpm is not None and tpm > 0 else None

    def reset(self) -> None:
        """Forget requests, faults, rules and counters, and refill the rate limits (which stay set)."""
        with self._lock:
            self._faults.clear()
            self._rules.clear()
            self.requests.clear()
            self.headers.clear()
            self.max_in_flight = 0
            self._refused = 0
            for bucket in (self._requests_limit, self._tokens_limit):
                if bucket is not None:
                    bucket.refill()

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def refused(self) -> int:
        """Requests answered 429 by the rate limit (they are counted in :attr:`calls` too)."""
        with self._lock:
            return self._refused

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    # -- request handling (runs in server threads) -----------------------------------------------

    @staticmethod
    def _matches(predicate: Callable[[dict[str, Any]], bool], body: dict[str, Any]) -> bool:
        try:
            return bool(predicate(body))
        except Exception:
            return False

    def _pick_fault(self, body: dict[str, Any]) -> Fault | None:
        with self._lock:
            rules = list(self._rules)
        for predicate, fault in rules:
            if self._matches(predicate, body):
                return fault
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _handle(self, handler: _Handler, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in handler.headers.items()})
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            self._answer(handler, body)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; False if interrupted."""
        return seconds <= 0 or not self._stopping.wait(seconds)

    def _authorised(self, handler: _Handler) -> bool:
        return self.expected_key is None or handler.headers.get("Authorization", "") == f"Bearer {self.expected_key}"

    def _admit(self, body: dict[str, Any]) -> Fault | None:
        """Take a request token, or the 429 to answer when a limit's bucket is empty (counted as refused)."""
        now = time.monotonic()
        with self._lock:
            limits = [(b, what) for b, what in ((self._requests_limit, "requests"), (self._tokens_limit, "tokens"))
                      if b is not None]
            waits = [(bucket.wait(now), bucket, what) for bucket, what in limits]
            wait, bucket, what = max(waits, key=lambda item: item[0], default=(0.0, None, ""))
            if bucket is None or wait <= 0:
                if self._requests_limit is not None:
                    self._requests_limit.take(1, now)
                return None
            self._refused += 1
        wait_ms = math.ceil(wait * 1000)  # rounded up: waiting this long always finds the token there
        model = str(body.get("model") or self.model)
        message = (f"Rate limit reached for {model} on {what} per min: Limit {bucket.per_minute:g}. "
                   f"Please try again in {wait_ms}ms.")
        return Fault.status(429, retry_after=max(1, math.ceil(wait_ms / 1000)), retry_after_ms=wait_ms,
                            message=message, error_code="rate_limit_exceeded")

    def _answer(self, handler: _Handler, body: dict[str, Any]) -> None:
        # The provider refuses an over-limit request before doing any work: at once, no latency.
        refusal = self._admit(body) if self._authorised(handler) else None
        if refusal is not None:
            self._send_error(handler, refusal)
            return

        if not self._sleep(self.latency):
            handler.close_connection = True
            return

        if not self._authorised(handler):
            self._send_error(handler, Fault.status(401))
            return

        fault = self._pick_fault(body)
        if fault is None:
            self._send_completion(handler, body, self._content(body))
        elif fault.kind == "status":
            self._send_error(handler, fault)
        elif fault.kind == "delay":
            if self._sleep(fault.seconds):
                self._send_completion(handler, body, self._content(body))
            else:
                handler.close_connection = True
        elif fault.kind == "truncated":
            payload = self._completion_payload(body, self._content(body))
            handler._send(200, payload[: max(1, len(payload) // 2)])
        elif fault.kind == "disconnect":
            handler.close_connection = True
        elif fault.kind == "trickle":
            self._trickle(handler, body, fault)
        elif fault.kind == "content":
            self._send_completion(handler, body, fault.text)
        else:  # pragma: no cover - programming error in a test
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _trickle(self, handler: _Handler, body: dict[str, Any], fault: Fault) -> None:
        if fault.status_code == 200:
            payload = self._completion_payload(body, self._content(body))
        else:
            payload = _error_body("slow error", "rate_limit_exceeded" if fault.status_code == 429 else "error")
        handler.close_connection = True
        try:
            handler.send_response(fault.status_code)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.flush()
            for index in range(len(payload)):
                if not self._sleep(fault.seconds):
                    return
                handler.wfile.write(payload[index:index + 1])
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass  # the client gave up: what a trickle is for

    def _content(self, body: dict[str, Any]) -> str:
        responder = self.responder or default_responder
        return responder(body)

    @staticmethod
    def _counted_tokens(body: dict[str, Any], content: str) -> tuple[int, int]:
        """(prompt, completion) tokens of a reply, counted with :func:`count_tokens`."""
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        return sum(count_tokens(_message_text(m)) for m in messages), count_tokens(content)

    def _completion_payload(self, body: dict[str, Any], content: str) -> bytes:
        prompt_tokens, completion_tokens = self._counted_tokens(body, content)
        with self._lock:
            number = len(self.requests)
        reply = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model") or self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage if self.usage is not None else {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return json.dumps(reply).encode()

    def _send_completion(self, handler: _Handler, body: dict[str, Any], content: str) -> None:
        handler._send(200, self._completion_payload(body, content), {"x-request-id": "req-fake"})
        with self._lock:
            bucket = self._tokens_limit
            if bucket is not None:
                total = self.usage.get("total_tokens") if self.usage is not None else None
                if not isinstance(total, int) or isinstance(total, bool):
                    total = sum(self._counted_tokens(body, content))
                bucket.debit(total, time.monotonic())

    def _send_error(self, handler: _Handler, fault: Fault) -> None:
        code = fault.status_code
        auth = handler.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ").strip()
        if fault.text:
            message = fault.text
        elif code == 401:
            # Like the real API, echo the key back: clients must not leak this into their errors.
            message = f"Incorrect API key provided: {key}. You can find your API key in your dashboard."
        else:
            try:
                message = HTTPStatus(code).phrase
            except ValueError:
                message = f"HTTP {code}"
        error_type = {
            400: "invalid_request_error",
            401: "invalid_request_error",
            403: "permission_denied",
            404: "invalid_request_error",
            429: "rate_limit_exceeded",
        }.get(code, "server_error" if code >= 500 else "error")
        headers = dict(fault.headers)
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = str(fault.retry_after_ms)
        handler._send(code, _error_body(message, error_type, fault.error_code), headers)
