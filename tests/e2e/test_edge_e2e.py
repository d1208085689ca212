"""The HTTP edge through a real `serve` process and real sockets: API keys, CORS, a slow body, a connection flood.

One service with two keys (one by flag, one from a key file), /metrics protected, one CORS
origin, a 3 s body deadline and a cap of 20 connections; the flood and the slow body must
leave /health answering, and the log must hold no traceback and only a few refusal lines.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import anthropic
import openai
import pytest

from proxy.auth import key_id
from tests.e2e.conftest import Server, running_proxy

pytestmark = pytest.mark.slow

FLAG_KEY = "sk-edge-flag-key"
FILE_KEY = "sk-edge-file-key"
ORIGIN = "https://app.example"
BODY_TIMEOUT_S = 3.0
MAX_CONNECTIONS = 20


@pytest.fixture(scope="module")
def edge(tiny_model, log_dir, tmp_path_factory) -> Iterator[Server]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# one key a line\n{FILE_KEY}\n")
    with running_proxy(
        tiny_model, log_dir, "--api-key", FLAG_KEY, "--api-key-file", str(key_file), "--protect-metrics",
        "--cors-origin", ORIGIN, "--body-timeout", str(BODY_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS),
        "--idle-timeout", "30", name="edge",
    ) as server:
        yield server


def get(server: Server, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, dict]:
    """(status, headers, JSON body or {}) with error statuses included."""
    request = urllib.request.Request(server.root + path, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if raw.strip().startswith(b"{") else {}
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, dict(error.headers), json.loads(raw) if raw else {}


def openai_client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def anthropic_client(server: Server, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.root, api_key=key, max_retries=0, timeout=60)


def test_openai_sdk_with_either_key_and_not_without(edge):
    for key in (FLAG_KEY, FILE_KEY):
        reply = openai_client(edge, key).chat.completions.create(
            model="default_model", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(edge, "sk-wrong").chat.completions.create(
            model="default_model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_anthropic_sdk_with_the_key_and_not_without(edge):
    message = anthropic_client(edge, FILE_KEY).messages.create(
        model="default_model", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert message.stop_reason in ("max_tokens", "end_turn")
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic_client(edge, "sk-wrong").messages.create(
            model="default_model", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.body["error"]["type"] == "authentication_error"


def test_bearer_and_x_api_key_both_work_health_is_open_metrics_is_not(edge):
    assert get(edge, "/v1/models", {"Authorization": f"Bearer {FLAG_KEY}"})[0] == 200
    assert get(edge, "/v1/models", {"x-api-key": FILE_KEY})[0] == 200
    status, headers, body = get(edge, "/v1/models")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and body["error"]["code"] == "invalid_api_key"
    assert get(edge, "/health")[0] == 200
    assert get(edge, "/metrics")[0] == 401
    assert get(edge, "/metrics", {"x-api-key": FLAG_KEY})[0] == 200
    assert key_id(FLAG_KEY) != key_id(FILE_KEY)


def test_cors_preflight_and_headers(edge):
    status, headers, _ = get(edge, "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, _ = get(edge, "/v1/models", {"Origin": ORIGIN, "x-api-key": FLAG_KEY})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers, _ = get(edge, "/v1/models", {"Origin": "https://other.example", "x-api-key": FLAG_KEY})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_a_slow_body_gets_408_within_the_timeout_and_health_answers_meanwhile(edge):
    sock = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {FLAG_KEY}\r\nContent-Length: 500\r\n\r\n".encode())
        start = time.monotonic()
        sock.settimeout(0.05)
        answer = b""
        healths = 0
        while time.monotonic() - start < BODY_TIMEOUT_S + 5:
            try:
                sock.sendall(b" ")  # a byte a second
            except OSError:
                break
            if get(edge, "/health")[0] == 200:
                healths += 1
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                answer += chunk
            if answer and b"\r\n\r\n" in answer:
                break
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"Connection: close" in head and b"request_timeout" in body
    assert BODY_TIMEOUT_S - 0.5 <= elapsed <= BODY_TIMEOUT_S + 2.5
    assert healths >= 2


def open_fds(pid: int) -> int | None:
    path = Path(f"/proc/{pid}/fd")
    return len(os.listdir(path)) if path.exists() else None


def test_a_connection_flood_is_refused_with_503_and_health_keeps_answering(edge):
    gc.collect()  # the earlier tests' SDK clients and their keep-alive connections go now, not mid-flood
    time.sleep(0.3)
    flood = 200
    request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {FLAG_KEY}\r\n\r\n".encode()
    socks: list[socket.socket] = []
    try:
        for _ in range(flood):
            sock = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
            sock.sendall(request)  # keep-alive: an admitted connection stays open after its answer
            socks.append(sock)
        answers = []
        for sock in socks:
            try:
                answers.append(sock.recv(65536))
            except OSError:
                answers.append(b"")
        statuses = [a.split(b" ", 2)[1] if a.startswith(b"HTTP/1.1 ") else b"closed" for a in answers]
        assert statuses.count(b"200") <= MAX_CONNECTIONS
        assert statuses.count(b"503") >= flood - MAX_CONNECTIONS - 10, {s: statuses.count(s) for s in set(statuses)}
        assert set(statuses) <= {b"200", b"503", b"closed"}
        refused = next(a for a in answers if a.startswith(b"HTTP/1.1 503"))
        assert b"Connection: close" in refused and b"too_many_connections" in refused
        fds = open_fds(edge.process.pid)
        if fds is not None:
            assert fds < MAX_CONNECTIONS + 150  # the admitted ones and the proxy's own, not the flood
        # the cap is full (the admitted connections stay open): health still answers, other requests get 503
        for _ in range(3):
            assert get(edge, "/health")[0] == 200
        with pytest.raises(openai.APIStatusError) as caught:
            openai_client(edge, FLAG_KEY).models.list()
        assert caught.value.status_code == 503
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.5)
    reply = openai_client(edge, FLAG_KEY).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "after the flood"}], max_tokens=3)
    assert reply.choices
    log = edge.log()
    assert "Traceback" not in log
    refusal_lines = [line for line in log.splitlines() if "over the cap" in line]
    assert 1 <= len(refusal_lines) <= 3, refusal_lines
