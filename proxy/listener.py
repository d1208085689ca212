"""Running the app: `web.run_app`'s loop, with the listening socket behind a `ConnectionGate`.

aiohttp's `run_app` builds its listening sockets itself and offers no hook for their
protocol factory, so this does what it does with its public parts (an `AppRunner`, the
runner's server as the factory, `loop.create_server`), the same shutdown included:
SIGTERM/SIGINT raise `GracefulExit`, the listener stops, idle connections close, running
handlers get `shutdown_timeout`, then the cleanup contexts run.

The listening sockets are bound by `bind_sockets` before anything else happens (before
a model is resolved, downloaded or loaded), so a port in use is a one-line error within
a second, not a traceback after the load; they start listening once the workers are up,
so until then connections are refused, as before.

Connections idle for `idle_timeout` are closed (aiohttp's keep-alive timeout, 75 s in
`run_app`, 3630 s in `AppRunner`); aiohttp starts that clock at the connection's start and
does not restart it as bytes trickle in, so it also bounds how long a request's headers
may take.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from contextlib import suppress
from dataclasses import dataclass

from aiohttp import web

from proxy.connections import AcceptErrorFilter, ConnectionGate

log = logging.getLogger("mlx_cache_proxy")

BACKLOG = 128  # aiohttp's default

# `serve`'s exit code when its port is in use: the one failure a later retry can cure (deploy/README.md).
EXIT_PORT_IN_USE = 3


class ListenError(OSError):
    """The address cannot be listened on; the message is one line naming it and why."""

    def __init__(self, message: str, in_use: bool = False) -> None:
        super().__init__(message)
        self.in_use = in_use


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` resolves to (not yet listening), or ListenError.

    As asyncio's `create_server` binds them: SO_REUSEADDR (a restart need not wait out the
    old connections' TIME_WAIT), IPv6 sockets IPv6-only. With port 0 every address gets the
    port the first one got.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on --host {host!r}: {exc.strerror or exc}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise _listen_error(exc, host, address[1]) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen_error(exc: OSError, host: str, port: int) -> ListenError:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ListenError(f"port {port} is in use on {host} (another server, or an instance still stopping); "
                           "stop it or choose another --port", in_use=True)  # fmt: skip
    if exc.errno == errno.EACCES:
        return ListenError(f"cannot listen on {where}: permission denied (ports below 1024 need privileges)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"cannot listen on {where}: {host} is not an address of this machine")
    return ListenError(f"cannot listen on {where}: {exc.strerror or exc}")


@dataclass(frozen=True)
class ListenOptions:
    host: str
    port: int
    max_connections: int
    idle_timeout: float
    shutdown_timeout: float


def run_app(app: web.Application, options: ListenOptions, sockets: list[socket.socket]) -> None:
    """Serves `app` on `sockets` (from `bind_sockets`) until SIGTERM/SIGINT.

    Exceptions from start-up (the cleanup contexts) propagate; the sockets are closed in the end.
    """
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, options, sockets))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve(app: web.Application, options: ListenOptions, sockets: list[socket.socket]) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorFilter(loop.get_exception_handler()))
    runner = web.AppRunner(
        app,
        handle_signals=True,
        shutdown_timeout=options.shutdown_timeout,
        keepalive_timeout=options.idle_timeout,
        handler_cancellation=True,  # a client that goes away cancels its handler: that aborts
    )
    await runner.setup()
    assert runner.server is not None
    gate = ConnectionGate(runner.server, options.max_connections)
    listeners: list[asyncio.Server] = []
    try:
        for sock in sockets:
            try:
                listeners.append(await loop.create_server(gate, sock=sock, backlog=BACKLOG))
            except OSError as exc:  # listen(): another socket bound to the port began listening first
                raise _listen_error(exc, options.host, sock.getsockname()[1]) from None
        port = sockets[0].getsockname()[1] if sockets else options.port
        log.info("======== Running on http://%s:%d (at most %d connections) ========",
                 options.host, port, options.max_connections)
        while True:
            await asyncio.sleep(3600)
    finally:
        for listener in listeners:
            listener.close()
        for sock in sockets:
            sock.close()
        gate.close()
        await runner.cleanup()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
