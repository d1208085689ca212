"""Fill the deploy templates: the launchd plist (default) or the newsyslog rule.

    python3 deploy/render_plist.py --venv DIR --config FILE --log-dir DIR --label LABEL
    python3 deploy/render_plist.py --newsyslog --log-dir DIR [--owner USER:GROUP]

Placeholders are `{{NAME}}`; a template naming one that is not given, or a value
given that no template uses, is an error, so template and installer cannot drift
apart unnoticed. Values are XML-escaped for the plist, and the result is parsed
back with `plistlib` and checked for the keys launchd needs. Stdlib only: this
runs under the system python3 as well as the venv's.
"""

from __future__ import annotations

import argparse
import grp
import os
import plistlib
import pwd
import re
import sys
from pathlib import Path
from typing import Mapping, Optional
from xml.sax.saxutils import escape

DEPLOY_DIR = Path(__file__).resolve().parent
PLIST_TEMPLATE = DEPLOY_DIR / "com.mlx-cache-proxy.plist.template"
NEWSYSLOG_TEMPLATE = DEPLOY_DIR / "newsyslog.d" / "mlx-cache-proxy.conf"
DEFAULT_LABEL = "com.mlx-cache-proxy"

_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Key -> type launchd expects; checked on every rendered plist.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "Label": str,
    "ProgramArguments": list,
    "RunAtLoad": bool,
    "KeepAlive": (bool, dict),
    "ThrottleInterval": int,
    "ProcessType": str,
    "StandardOutPath": str,
    "StandardErrorPath": str,
    "WorkingDirectory": str,
    "EnvironmentVariables": dict,
    "ExitTimeOut": int,
}


class RenderError(ValueError):
    """A template that cannot be filled, or a result launchd/newsyslog would reject."""


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace every `{{NAME}}`; every placeholder must have a value and every value a placeholder."""
    used = set(_PLACEHOLDER.findall(template))
    missing = sorted(used - set(values))
    if missing:
        raise RenderError(f"no value for placeholder(s): {', '.join(missing)}")
    unused = sorted(set(values) - used)
    if unused:
        raise RenderError(f"value(s) given for no placeholder: {', '.join(unused)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def plist_values(venv: str, config: str, log_dir: str, label: str = DEFAULT_LABEL) -> dict[str, str]:
    """Placeholder values for the plist; paths made absolute (launchd expands neither ~ nor relative paths)."""
    if not _LABEL.match(label):
        raise RenderError(f"label {label!r}: use letters, digits, '.', '-' and '_' (e.g. {DEFAULT_LABEL})")
    config_path = _absolute(config)
    return {
        "LABEL": label,
        "VENV": _absolute(venv),
        "CONFIG": config_path,
        "LOG_DIR": _absolute(log_dir),
        # Relative paths in the config (a local model directory) mean: next to the config.
        "WORKDIR": os.path.dirname(config_path),
    }


def render_plist(values: Mapping[str, str], template: Optional[str] = None) -> str:
    text = PLIST_TEMPLATE.read_text() if template is None else template
    rendered = fill(text, {k: escape(v, {'"': "&quot;"}) for k, v in values.items()})
    check_plist(parse_plist(rendered))
    return rendered


def parse_plist(text: str) -> dict:
    try:
        data = plistlib.loads(text.encode())
    except Exception as exc:  # plistlib raises expat and ValueError alike
        raise RenderError(f"the rendered plist does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise RenderError("the rendered plist is not a dictionary")
    return data


def check_plist(data: Mapping) -> None:
    """The keys launchd needs, with the types it accepts."""
    for key, kind in REQUIRED_KEYS.items():
        if key not in data:
            raise RenderError(f"the plist has no {key}")
        # bool is an int in Python; launchd does not take <true/> for a number.
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise RenderError(f"plist key {key} is a {type(data[key]).__name__}")
    arguments = data["ProgramArguments"]
    if not arguments or not all(isinstance(a, str) for a in arguments):
        raise RenderError("ProgramArguments must be a non-empty list of strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["EnvironmentVariables"].items()):
        raise RenderError("EnvironmentVariables must map strings to strings")
    for key in ("StandardOutPath", "StandardErrorPath", "WorkingDirectory"):
        if not os.path.isabs(data[key]):
            raise RenderError(f"{key} must be an absolute path, not {data[key]!r}")


def newsyslog_values(log_dir: str, owner: Optional[str] = None) -> dict[str, str]:
    log_dir = _absolute(log_dir)
    if re.search(r"\s", log_dir):
        raise RenderError(f"newsyslog cannot rotate files under {log_dir!r}: its fields are split on whitespace")
    owner = owner or current_owner()
    if not re.match(r"^[^\s:]+:[^\s:]+$", owner):
        raise RenderError(f"owner {owner!r}: expected USER:GROUP")
    return {"LOG_DIR": log_dir, "OWNER": owner}


def render_newsyslog(values: Mapping[str, str], template: Optional[str] = None) -> str:
    return fill(NEWSYSLOG_TEMPLATE.read_text() if template is None else template, values)


def current_owner() -> str:
    """USER:GROUP of whoever runs this: the files newsyslog (running as root) creates must stay theirs."""
    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="render_plist.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--newsyslog", action="store_true", help="print the newsyslog rule instead of the plist")
    parser.add_argument("--venv", help="the installed virtualenv (holds bin/mlx-cache-proxy)")
    parser.add_argument("--config", help="the service's TOML config file")
    parser.add_argument("--log-dir", required=True, help="where the service writes its logs")
    parser.add_argument("--label", default=DEFAULT_LABEL, help=f"launchd label (default {DEFAULT_LABEL})")
    parser.add_argument("--owner", help="USER:GROUP owning rotated logs (default: the current user)")
    args = parser.parse_args(argv)
    try:
        if args.newsyslog:
            sys.stdout.write(render_newsyslog(newsyslog_values(args.log_dir, args.owner)))
        else:
            if not args.venv or not args.config:
                parser.error("--venv and --config are required for the plist")
            sys.stdout.write(render_plist(plist_values(args.venv, args.config, args.log_dir, args.label)))
    except RenderError as exc:
        print(f"render_plist.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
