"""An OpenAI-shaped server that answers every chat completion at once: the HTTP and client floor.

    .venv/bin/python -m tests.benchmarks.echo_server --port 8099

It reads and parses the request body as any server must, then streams one
content chunk, a usage chunk and [DONE]. The time a client waits for that first chunk is what
the HTTP round trip and the client's own work on a long request cost, whichever
server answers (bench_warm_ttft subtracts it to show what the proxy itself adds).
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

CHUNK = {
    "id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 0, "model": "echo",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "x"}, "finish_reason": None}],
}  # fmt: skip
USAGE = {
    "id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 0, "model": "echo", "choices": [],
    "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}},
}  # fmt: skip


async def chat(request: web.Request) -> web.StreamResponse:
    json.loads(await request.read())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(f"data: {json.dumps(CHUNK)}\n\n".encode())
    await response.write(f"data: {json.dumps(USAGE)}\n\n".encode())  # as stream_options.include_usage asks
    await response.write(b"data: [DONE]\n\n")
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
