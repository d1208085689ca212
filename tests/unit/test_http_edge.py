"""The HTTP edge: API keys, CORS, the body deadline and the connection cap, on small real aiohttp apps."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from proxy import connections as conn
from proxy.app import _error_response, api_errors
from proxy.auth import CLIENT_ID, ApiKeys, auth_middleware, client_id, key_id, presented_keys, read_key_file
from proxy.config import ProxyConfig
from proxy.cors import CorsPolicy, install_cors
from proxy.request_body import body_deadline_middleware
from proxy.state import CONFIG

# ----------------------------------------------------------------- keys


def test_keys_are_found_by_bearer_or_x_api_key_and_named_without_the_secret():
    keys = ApiKeys(["alpha-key", "beta-key"])
    assert keys.identify({"Authorization": "Bearer alpha-key"}) == key_id("alpha-key")
    assert keys.identify(CIMultiDict({"authorization": "bearer  beta-key "})) == key_id("beta-key")
    assert keys.identify({"x-api-key": "beta-key"}) == key_id("beta-key")
    assert keys.identify({"Authorization": "Bearer wrong", "x-api-key": "alpha-key"}) == key_id("alpha-key")
    for headers in ({}, {"Authorization": "Bearer alpha"}, {"Authorization": "Basic alpha-key"}, {"x-api-key": ""}):
        assert keys.identify(headers) is None
    ident = key_id("alpha-key")
    assert len(ident) == 16 and ident != key_id("beta-key") and "alpha" not in ident
    assert presented_keys({"Authorization": "Bearer a", "x-api-key": "b"}) == ["a", "b"]


@pytest.mark.parametrize("bad", ["", " padded", "padded "])
def test_a_blank_or_padded_key_is_refused(bad):
    with pytest.raises(ValueError):
        ApiKeys([bad])


def test_key_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nk1\n\n  k2  \n")
    assert read_key_file(str(path)) == ["k1", "k2"]
    path.write_text("# none\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_key_file(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        read_key_file(str(tmp_path / "missing"))


def test_cors_policy():
    policy = CorsPolicy(["https://app.example/", "http://localhost:3000"])
    assert policy.allow_origin("https://app.example") == "https://app.example"
    assert policy.allow_origin("https://APP.example") == "https://APP.example"
    assert policy.allow_origin("https://evil.example") is None and policy.allow_origin(None) is None
    assert CorsPolicy(["*"]).allow_origin("https://any.example") == "*"
    with pytest.raises(ValueError):
        CorsPolicy(["app.example"])


# ----------------------------------------------------------------- the middlewares on a small app


def edge_app(**config) -> web.Application:
    """The proxy's middlewares, in create_app's order, around handlers that echo what they saw."""
    cfg = ProxyConfig(models=(), **config)
    app = web.Application()
    app[CONFIG] = cfg
    keys = ApiKeys(cfg.api_keys)
    app.middlewares.extend([
        *install_cors(app, cfg.cors_origins), api_errors,
        *([auth_middleware(keys, cfg.protect_metrics)] if keys else []),
        body_deadline_middleware(cfg.body_timeout, _error_response),
    ])

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"client": client_id(request), "set": CLIENT_ID in request, "bytes": len(body)})

    for path in ("/v1/chat/completions", "/v1/messages"):
        app.router.add_post(path, echo)
    for path in ("/health", "/v1/health", "/health/workers", "/metrics", "/v1/models"):
        app.router.add_get(path, echo)
    return app


async def client_for(app: web.Application) -> TestClient:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_keys_guard_every_route_but_health_and_metrics():
    client = await client_for(edge_app(api_keys=("k1", "k2")))
    try:
        for headers in ({"Authorization": "Bearer k1"}, {"x-api-key": "k2"}):
            response = await client.post("/v1/chat/completions", json={}, headers=headers)
            assert response.status == 200
            assert (await response.json())["client"] == key_id(headers.get("x-api-key", "k1"))
        response = await client.post("/v1/chat/completions", json={})
        assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        error = (await response.json())["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert "didn't provide" in error["message"]
        response = await client.post("/v1/messages", json={}, headers={"x-api-key": "nope"})
        assert response.status == 401
        assert await response.json() == {"type": "error", "error": {"type": "authentication_error",
                                                                     "message": "Incorrect API key provided."}}
        assert (await client.get("/v1/models")).status == 401
        for path in ("/health", "/v1/health", "/health/workers", "/metrics"):
            response = await client.get(path)
            assert response.status == 200 and (await response.json())["client"] == ""
    finally:
        await client.close()


async def test_protect_metrics_keeps_health_open():
    client = await client_for(edge_app(api_keys=("k1",), protect_metrics=True))
    try:
        assert (await client.get("/metrics")).status == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer k1"})).status == 200
        assert (await client.get("/health")).status == 200
    finally:
        await client.close()


async def test_no_keys_no_check_and_an_empty_client_id():
    client = await client_for(edge_app())
    try:
        response = await client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer anything"})
        assert response.status == 200 and (await response.json())["client"] == ""
    finally:
        await client.close()


async def test_cors_preflight_needs_no_key_and_errors_carry_the_origin():
    client = await client_for(edge_app(api_keys=("k1",), cors_origins=("https://app.example",)))
    try:
        response = await client.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        allowed = response.headers["Access-Control-Allow-Headers"]
        for header in ("authorization", "x-api-key", "content-type", "anthropic-version", "x-stainless-os"):
            assert header in allowed
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert int(response.headers["Access-Control-Max-Age"]) > 0
        response = await client.options("/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers
        response = await client.post("/v1/chat/completions", json={}, headers={"Origin": "https://app.example"})
        assert response.status == 401 and response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        response = await client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer k1"})
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
    finally:
        await client.close()


async def test_a_slow_body_gets_408_and_the_connection_closes():
    client = await client_for(edge_app(body_timeout=0.3))
    try:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 3)  # until the server closes
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
        assert json.loads(body)["error"]["code"] == "request_timeout"
        # a body in time is read once, here, and the handler gets it
        response = await client.post("/v1/chat/completions", data=b"x" * 5000)
        assert (await response.json())["bytes"] == 5000
    finally:
        await client.close()


# ----------------------------------------------------------------- the connection cap


async def raw_get(port: int, path: str, timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_over_the_cap_503_but_health_gets_through(caplog):
    app = edge_app()
    runner = web.AppRunner(app, keepalive_timeout=30)
    await runner.setup()
    gate = conn.ConnectionGate(runner.server, limit=3)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(gate, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    held = []
    caplog.set_level(logging.WARNING, "mlx_cache_proxy")
    try:
        for _ in range(3):  # idle connections fill the cap
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.05)
        assert gate.open == 3
        for path in ("/v1/models", "/v1/messages"):
            answer = await raw_get(port, path)
            assert answer.startswith(b"HTTP/1.1 503") and b"Connection: close" in answer
        assert b"too_many_connections" in await raw_get(port, "/v1/models")
        assert b"overloaded_error" in await raw_get(port, "/v1/messages")
        for path in ("/health", "/v1/health", "/metrics"):
            assert (await raw_get(port, path)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.05)
        assert gate.refusing == 0 and gate.monitoring == 0 and gate.refused_total == 4
        refusals = [r for r in caplog.records if "over the cap" in r.getMessage()]
        assert len(refusals) == 1  # the first at once, the rest counted for the next interval
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        assert gate.open == 0
        assert (await raw_get(port, "/v1/models")).startswith(b"HTTP/1.1 200")
    finally:
        listener.close()
        gate.close()
        await runner.cleanup()
    assert "refused 3 connection" in caplog.text  # flushed at close


def test_default_cap_leaves_room_for_the_rest():
    assert conn.default_max_connections(256) == 16
    assert conn.default_max_connections(2560) == 1280
    assert conn.default_max_connections(1 << 20) == conn.MAX_DEFAULT_CONNECTIONS
    conn.check_max_connections(1000, 4096)
    with pytest.raises(ValueError, match="open-file limit"):
        conn.check_max_connections(4000, 4096)


def test_request_head_parsing():
    assert conn.request_path(b"GET /health?x=1 HTTP/1.1\r\nHost: x\r\n\r\n") == "/health"
    assert conn.request_path(b"garbage") is None
    assert conn.is_monitoring_request(b"GET /v1/health HTTP/1.1\r\n")
    assert not conn.is_monitoring_request(b"POST /health HTTP/1.1\r\n")
    assert not conn.is_monitoring_request(b"GET /healthz HTTP/1.1\r\n")


def test_accept_errors_are_logged_once_per_interval(caplog):
    now = [0.0]
    seen = []
    handler = conn.AcceptErrorFilter(lambda loop, context: seen.append(context), clock=lambda: now[0])
    caplog.set_level(logging.ERROR, "mlx_cache_proxy")
    loop = asyncio.new_event_loop()
    try:
        for _ in range(50):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "EMFILE")})
        now[0] = conn.REFUSAL_LOG_INTERVAL_S + 1
        handler(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "EMFILE")})
        handler(loop, {"message": "something else"})
    finally:
        loop.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "(1 time(s)" in messages[0] and "(50 time(s)" in messages[1]
    assert all(r.exc_info is None for r in caplog.records)
    assert seen == [{"message": "something else"}]


# ----------------------------------------------------------------- options


def test_keys_from_env_list_and_key_file_and_bad_values_are_start_up_errors(tmp_path):
    from proxy.options import resolve
    from proxy.serve import edge_options

    key_file = tmp_path / "keys"
    key_file.write_text("k3\n")
    values = resolve(["--api-key-file", str(key_file), "--max-connections", "100"], {"MLX_CACHE_PROXY_API_KEY": "k1, k2"})
    edge = edge_options(values)
    assert edge["api_keys"] == ("k1", "k2", "k3") and edge["max_connections"] == 100
    assert "k1" not in repr(ProxyConfig(models=(), **edge))
    assert edge_options(resolve([], {}))["max_connections"] >= 16
    for argv in (["--cors-origin", "app.example"], ["--api-key-file", str(tmp_path / "none")],
                 ["--max-connections", "100000000"]):
        with pytest.raises(ValueError):
            edge_options(resolve(argv, {}))


def test_the_proxys_own_key_is_not_forwarded_upstream():
    from proxy.upstream import forwarded_headers

    headers = {"Authorization": "Bearer k", "x-api-key": "k", "X-A": "1"}
    assert forwarded_headers(headers) == headers  # no keys here: the client's key is the upstream's
    assert forwarded_headers(headers, drop_keys=True) == {"X-A": "1"}
