"""CURVE keys for the proxy <-> worker link: what both ends share about securing it.

ZeroMQ's own CURVE (pyzmq's `zmq.auth`; no crypto of ours) authenticates both
ends: the proxy names the worker's public key it trusts (a CURVE client's
`curve_serverkey`), and the worker admits only the proxy public keys it was
given (ZAP, through `zmq.auth.thread.ThreadAuthenticator`). Key files are the
ones `zmq.auth.create_certificates` writes: `NAME.key` (public, to copy) and
`NAME.key_secret` (both halves, never copied).

A `tcp://` endpoint that is not loopback is reachable by other machines, so it
needs keys; loopback and `ipc://` may go without (the OS guards them).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import zmq
import zmq.auth

from protocol.log_throttle import LogThrottle
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("mlx_cache_proxy.link")

KEY_NAMES = ("worker", "proxy")
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
DENIED_LOG_INTERVAL_S = 10.0


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or not a CURVE key; the message names the file."""


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for `ipc://`, `inproc://` and `tcp://` on a loopback address (127.0.0.0/8, ::1, localhost).

    Every other transport ZeroMQ may offer (ws, wss, tipc, udp, vmci, ...) counts as reachable.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True  # never leave the machine
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # '*', an interface name or a host name: may be reachable from elsewhere
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# ----------------------------------------------------------------- key files


def write_key_pairs(directory: Path, names: tuple[str, ...] = KEY_NAMES) -> list[Path]:
    """Write a key pair per name into `directory` (created 0700); every file readable by the owner only."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    for name in names:
        for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
            if (directory / f"{name}{suffix}").exists():
                raise FileExistsError(f"{directory / (name + suffix)} exists; not overwriting a key")
    for name in names:
        public, secret = zmq.auth.create_certificates(directory, name)
        for path in (Path(public), Path(secret)):
            os.chmod(path, 0o600)
            written.append(path)
    return written


def load_secret_key(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path: str) -> bytes:
    return _load(path)[0]


def load_allowed_keys(path: str) -> set[bytes]:
    """The public keys in a `.key` file, or in every `.key` file of a directory."""
    location = Path(path).expanduser()
    if location.is_dir():
        files = sorted(location.glob(f"*{PUBLIC_SUFFIX}"))
        if not files:
            raise KeyFileError(f"{path} holds no {PUBLIC_SUFFIX} files")
        return {load_public_key(str(f)) for f in files}
    return {load_public_key(path)}


def _load(path: str) -> tuple[bytes, Optional[bytes]]:
    try:
        public, secret = zmq.auth.load_certificate(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the CURVE key {path}: {exc}") from exc
    if public is None or len(public) != 40:
        raise KeyFileError(f"{path} is not a CURVE key file")
    return public, secret


# ----------------------------------------------------------------- sockets


@dataclass(frozen=True)
class ClientKeys:
    """The proxy's side: its own key pair and the worker's public key it trusts."""

    public: bytes
    secret: bytes
    server_public: bytes

    def apply(self, sock: Any) -> None:
        """Make `sock` a CURVE client; before `connect`."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public


@dataclass(frozen=True)
class ServerKeys:
    """The worker's side: its own key pair and the proxy public keys it admits."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]

    @classmethod
    def load(cls, secret_path: str, allowed_path: str) -> "ServerKeys":
        public, secret = load_secret_key(secret_path)
        allowed = load_allowed_keys(allowed_path) - {public}  # its own public key admits nobody
        if not allowed:
            raise KeyFileError(f"{allowed_path} holds no proxy public key (only the worker's own)")
        return cls(public, secret, frozenset(allowed))

    def apply(self, sock: Any) -> None:
        """Make `sock` a CURVE server; before `bind`."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


class AllowedClients:
    """ZAP credentials provider: a client is admitted when its public key is listed.

    A denial is logged as a warning, at most once per DENIED_LOG_INTERVAL_S (a
    stranger may knock often).
    """

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed
        self._denied = LogThrottle(DENIED_LOG_INTERVAL_S)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        count = self._denied.count()
        if count:
            log.warning(
                "refused a connection whose CURVE key %s is not an allowed proxy key (%d refusal(s))",
                key.decode(errors="replace"), count,
            )  # fmt: skip
        return False


def start_authenticator(context: zmq.Context, keys: ServerKeys) -> ThreadAuthenticator:
    """ZAP for every CURVE server socket of `context`; stop it before terminating the context."""
    auth = ThreadAuthenticator(context, log=logging.getLogger("mlx_cache_proxy.link.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=AllowedClients(keys.allowed))
    return auth


# ----------------------------------------------------------------- `mlx-cache-proxy keys`


def keys_main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlx-cache-proxy keys",
        description="Write CURVE key pairs for the proxy <-> worker link: NAME.key (public, copy it to the "
        "other side) and NAME.key_secret (keep it where it is). Files are readable by their owner only.",
    )
    parser.add_argument("directory", metavar="DIR", help="where to write the keys (created if missing)")
    parser.add_argument(
        "--only", choices=KEY_NAMES, default=None,
        help="write one pair: 'worker' on the worker's machine, 'proxy' on the proxy's (default: both)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    names = (args.only,) if args.only else KEY_NAMES
    try:
        written = write_key_pairs(Path(args.directory), names)
    except OSError as exc:
        print(f"mlx-cache-proxy keys: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0
