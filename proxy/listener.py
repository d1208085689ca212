"""Running the app: `web.run_app`'s loop, with the listening socket behind a `ConnectionGate`.

aiohttp's `run_app` builds its listening sockets itself and offers no hook for their
protocol factory, so this does what it does with its public parts (an `AppRunner`, the
runner's server as the factory, `loop.create_server`), the same shutdown included:
SIGTERM/SIGINT raise `GracefulExit`, the listener stops, idle connections close, running
handlers get `shutdown_timeout`, then the cleanup contexts run.

Connections idle for `idle_timeout` are closed (aiohttp's keep-alive timeout, 75 s in
`run_app`, 3630 s in `AppRunner`); aiohttp starts that clock at the connection's start and
does not restart it as bytes trickle in, so it also bounds how long a request's headers
may take.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from dataclasses import dataclass

from aiohttp import web

from proxy.connections import AcceptErrorFilter, ConnectionGate

log = logging.getLogger("mlx_cache_proxy")

BACKLOG = 128  # aiohttp's default


@dataclass(frozen=True)
class ListenOptions:
    host: str
    port: int
    max_connections: int
    idle_timeout: float
    shutdown_timeout: float


def run_app(app: web.Application, options: ListenOptions) -> None:
    """Serves `app` until SIGTERM/SIGINT; exceptions from start-up (the cleanup contexts) propagate."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, options))
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


async def _serve(app: web.Application, options: ListenOptions) -> None:
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
    listener = None
    try:
        listener = await loop.create_server(gate, options.host, options.port, backlog=BACKLOG, reuse_address=True)
        log.info("======== Running on http://%s:%d (at most %d connections) ========",
                 options.host, options.port, options.max_connections)
        while True:
            await asyncio.sleep(3600)
    finally:
        if listener is not None:
            listener.close()
        gate.close()
        await runner.cleanup()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
