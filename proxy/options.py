"""`serve` options, from four places: flag over environment over TOML file over default.

One table (`OPTIONS`) drives all of them: the argparse flags (and `serve --help`),
the environment variables (`MLX_CACHE_PROXY_` + the option name in capitals), and
the keys of the `--config` TOML file (the option name, dashes or underscores).
A value that does not parse is a start-up error naming where it came from.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from proxy.config import GIB, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "MLX_CACHE_PROXY_"


class OptionError(ValueError):
    """A configuration value that cannot be used; the message says where it came from."""


@dataclass(frozen=True)
class Option:
    name: str  # the flag without dashes, with underscores: also the TOML key
    parse: Callable[[Any], Any]  # from a string (flag, env) or a TOML value
    default: Any
    help: str
    metavar: Optional[str] = None
    repeat: bool = False  # a list: the flag repeats, env and TOML give several
    flag: bool = False  # a switch without a value

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def dashed(self) -> str:
        return "--" + self.name.replace("_", "-")


# ----------------------------------------------------------------- parsers


def _number(kind: type, low: float, high: Optional[float] = None) -> Callable[[Any], Any]:
    """A parser of finite int or float values in [low, high] (a TOML true is not a 1, nor 2.5 an int)."""

    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        number = kind(value)
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        if number < low:
            raise ValueError(f"must be at least {low}, got {number}")
        if high is not None and number > high:
            raise ValueError(f"must be at most {high}, got {number}")
        return number

    return parse


def _int(low: int, high: Optional[int] = None) -> Callable[[Any], int]:
    return _number(int, low, high)


def _float(low: float, high: Optional[float] = None) -> Callable[[Any], float]:
    return _number(float, low, high)


def _size_at_least(low: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        size = _size(value)
        if size < low:
            raise ValueError(f"must be at least {low} bytes, got {size}")
        return size

    return parse


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    return parse_size(str(value))


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value)
        if text.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text.lower()

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def default_cache_dir() -> str:
    from worker.tiny_models import cache_home

    return str(Path(cache_home()) / "checkpoints")


OPTIONS: tuple[Option, ...] = (
    Option("model", _str, [], "a model to serve (repeatable), listed and requested under exactly this name; "
           "none: the built-in tiny model, as 'default'", "PATH_OR_HF_ID", repeat=True),
    Option("worker", _str, [], "a worker already running elsewhere, serving model NAME (repeatable; a NAME "
           "given several times: replicas of one model)",
           "NAME=ENDPOINT", repeat=True),
    Option("worker_public_key", _str, [], "the CURVE public key file (worker.key from `mlx-cache-proxy keys`) "
           "of the --worker serving NAME: the link is encrypted and only that worker is trusted (repeatable); "
           "NAME@ENDPOINT=FILE names one of several --worker NAME=... replicas", "NAME=FILE", repeat=True),
    Option("replicas", _int(1, 64), 1, "local workers per --model (each loads the model: N times its memory); "
           "requests are routed to the one with most of the prompt cached, else the least loaded", "N"),
    Option("route_cache_weight", _float(0), 1.0, "with replicas: how much a cached prefix counts against a "
           "replica's wait (0: route by load alone; larger: follow the cache through longer waits)", "W"),
    Option("route_prefill_tps", _float(0), 0.0, "with replicas: prompt tokens per second a cached token is "
           "valued at; 0: measured from each worker's prefills", "TPS"),
    Option("curve_secret_key", _str, "", "this proxy's CURVE key pair (proxy.key_secret), used with "
           "--worker-public-key; workers admit its public half (proxy.key)", "FILE"),
    Option("host", _str, "127.0.0.1", "address to listen on"),
    Option("port", _int(0, 65535), 8080, "port to listen on; 0: any free port (logged). A port in use exits "
           "with code 3 before any model loads"),
    Option("max_queue", _int(0), 32, "requests that may wait per worker; more get 429", "N"),
    # The default is the worker's (worker/main.py DEFAULT_MAX_BATCH); the proxy only forwards a choice.
    Option("max_batch", _int(1), None, "requests each local worker runs at once, their decode steps batched; "
           "1: one at a time (worker default: 8). A remote worker's own setting applies", "N"),
    Option("alias", _str, [], "another name for a served model (repeatable); NAME may be a pattern with * ? [...], "
           "e.g. 'claude-*=MODEL' (an exact name beats a pattern, a longer pattern a shorter one)", "NAME=MODEL",
           repeat=True),
    Option("default_model", _str, "", "serve requests for a model no name or alias matches with this served "
           "model; default: they get 404 (or go to --upstream)", "MODEL"),
    Option("upstream", _str, None, "forward requests for models served nowhere here to this server", "URL"),
    Option("cache_bytes", _size, None, "checkpoint pool size per worker, e.g. 512M, 48G (worker default: "
           "75%% of the memory its model leaves under its memory limit)", "BYTES"),
    Option("checkpoint_interval", _int(1), None, "tokens between lattice checkpoints (worker default: 256)", "N"),
    Option("no_cache", _bool, False, "turn the prefix cache off (every request computes its whole prompt)",
           flag=True),
    Option("prefill_step", _int(1), None, "prefill chunk size in tokens (worker default: 512)", "N"),
    Option("cache_dir", _str, "", "directory of the disk tier of checkpoints "
           "(default: 'checkpoints' under the user's cache directory)", "DIR"),
    Option("disk_cache_bytes", _size, 32 * GIB, "disk tier budget per model; 0 turns the disk tier off", "BYTES"),
    Option("memory_limit", _size, 0, "memory budget for each worker's MLX allocations; 0: the device's "
           "recommended working set (else 90%% of RAM). Requests that cannot fit get 503", "BYTES"),
    Option("max_kv_size", _int(0), 0, "cap on prompt + max_tokens per request; 0: the model's context limit", "N"),
    Option("max_tokens", _int(1), 512, "max_tokens of a request that gives none", "N"),
    Option("max_body_bytes", _size_at_least(1024), 16 * 1024**2, "largest request body accepted", "BYTES"),
    Option("shutdown_timeout", _float(0), 30.0, "on SIGTERM, how long running requests may take to finish",
           "SECONDS"),
    Option("heartbeat_timeout", _float(2.0), 60.0, "a worker silent this long counts as dead "
           "(workers beat every second)", "SECONDS"),
    Option("unresponsive_after", _float(0.5), 5.0, "a worker silent this long makes /health 503 (not ready) "
           "until it answers again; --heartbeat-timeout decides when it counts as dead", "SECONDS"),
    Option("worker_start_timeout", _float(1), 600.0, "model load + handshake limit", "SECONDS"),
    Option("keepalive_interval", _float(0.01), 5.0, "SSE keep-alive comment interval while a stream waits",
           "SECONDS"),
    Option("api_key", _str, [], "an API key clients must send (Authorization: Bearer or x-api-key; repeatable); "
           "none: no key needed. Prefer the environment or --api-key-file: flags show in ps", "KEY", repeat=True),
    Option("api_key_file", _str, "", "read API keys from this file, one a line ('#' starts a comment)", "PATH"),
    Option("protect_metrics", _bool, False, "with API keys, /metrics needs a key too (/health stays open)",
           flag=True),
    Option("cors_origin", _str, [], "a browser origin allowed to call the API, e.g. https://app.example, or '*' "
           "(repeatable); none: no CORS headers", "ORIGIN", repeat=True),
    Option("body_timeout", _float(0.1), 30.0, "a request body must arrive whole within this; later: 408", "SECONDS"),
    Option("idle_timeout", _float(0.1), 15.0, "an idle keep-alive connection, or one whose request headers have "
           "not all arrived, is closed after this long", "SECONDS"),
    Option("max_connections", _int(0), 0, "open client connections at most; more are answered 503 and closed "
           "(/health and /metrics keep a few more); 0: from the open-file limit", "N"),
    Option("reasoning_field", _choice("both", "reasoning", "reasoning_content"), "both", "where chat replies put "
           "the model's reasoning: 'reasoning' (mlx_lm.server, vLLM), 'reasoning_content' (DeepSeek, older vLLM) "
           "or both", "FIELD"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Option("log_format", _choice("text", "json"), "text", "log line format"),
    Option("log_file", _str, "", "also log to this file (reopened when rotated away); default: stderr only",
           "PATH"),
    Option("stderr_level", _choice("debug", "info", "warning", "error"), "", "log level of stderr; default: "
           "--log-level (the LaunchAgent sets warning: its stderr file is never reopened)"),
)

BY_NAME = {o.name: o for o in OPTIONS}


# ----------------------------------------------------------------- parser and resolution


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-cache-proxy serve",
        description="OpenAI-compatible caching proxy in front of MLX workers.",
        epilog=f"Every option can also come from the environment ({ENV_PREFIX}NAME, e.g. {ENV_PREFIX}PORT=9000; "
        "lists comma-separated) or from the --config TOML file (key = option name, e.g. cache_bytes = \"8G\"). "
        "Precedence: flag, then environment, then file, then default.",
    )
    parser.add_argument("--config", metavar="FILE.toml", help="read options from this TOML file")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of this package, mlx and mlx-lm")
    for option in OPTIONS:
        default = "" if option.default in (None, "", [], False) else f" (default: {_shown(option.default)})"
        help_text = f"{option.help}{default} [env {option.env}]"
        if option.flag:
            parser.add_argument(option.dashed, action="store_const", const="true", default=None, help=help_text)
        elif option.repeat:
            parser.add_argument(option.dashed, action="append", default=None, metavar=option.metavar, help=help_text)
        else:
            parser.add_argument(option.dashed, default=None, metavar=option.metavar, help=help_text)
    return parser


class _VersionAction(argparse.Action):
    """argparse's "version" action, with the text read only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, help: Optional[str] = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from proxy.version import version_text

        print(version_text())
        parser.exit()


def _shown(value: Any) -> str:
    if isinstance(value, int) and value >= 1024**2 and value % 1024**2 == 0:
        return f"{value // 1024**3}G" if value % 1024**3 == 0 else f"{value // 1024**2}M"
    return str(value)


def resolve(argv: Optional[list[str]], environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Every option's value, by precedence. Raises OptionError (or SystemExit for --help)."""
    args = build_parser().parse_args(argv)
    file_values = _read_toml(Path(args.config)) if args.config else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        flag_value = getattr(args, option.name)
        if flag_value is not None:
            values[option.name] = _parse(option, flag_value, f"flag {option.dashed}")
        elif option.env in environ:
            raw = environ[option.env]
            value = [v.strip() for v in raw.split(",") if v.strip()] if option.repeat else raw
            values[option.name] = _parse(option, value, f"environment variable {option.env}")
        elif option.name in file_values:
            values[option.name] = _parse(option, file_values[option.name], f"{args.config}, key {option.name}")
        else:
            values[option.name] = option.default
    return values


def _parse(option: Option, value: Any, source: str) -> Any:
    try:
        if option.repeat:
            items = value if isinstance(value, list) else [value]
            return [option.parse(item) for item in items]
        return option.parse(value)
    except (ValueError, TypeError) as exc:
        raise OptionError(f"invalid {option.name} from {source}: {exc}") from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise OptionError(f"cannot read the config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"the config file {path} is not valid TOML: {exc}") from exc
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise OptionError(f"unknown option(s) in {path}: {', '.join(unknown)}")
    return values
