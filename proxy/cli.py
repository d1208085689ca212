"""The `mlx-cache-proxy` command: one entry point, a subcommand per role.

Subcommands import their modules lazily so that `serve` (the proxy) never
imports MLX and `make-model` never imports aiohttp.
"""

from __future__ import annotations

import sys

USAGE = """usage: mlx-cache-proxy COMMAND [options]

commands:
  serve        run the OpenAI-compatible proxy and its workers
  worker       run one MLX worker process (normally started by `serve`)
  make-model   write a tiny real mlx-lm model directory (random weights)
  keys         write CURVE key pairs for a secure link to a remote worker

  --version    print the versions of this package, mlx and mlx-lm
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        from proxy.version import version_text

        print(version_text())
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        from proxy.serve import main as run
    elif command == "worker":
        from worker.main import main as run
    elif command == "make-model":
        from worker.tiny_models import main as run
    elif command == "keys":
        from protocol.curve import keys_main as run
    else:
        print(f"mlx-cache-proxy: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
