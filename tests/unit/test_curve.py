"""CURVE key files, the loopback rule and the proxy's key options (no sockets)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from protocol.curve import (
    AllowedClients,
    KeyFileError,
    ServerKeys,
    is_loopback_endpoint,
    load_allowed_keys,
    load_public_key,
    load_secret_key,
    write_key_pairs,
)
from proxy.config import ModelSpec
from proxy.serve import with_link_keys


@pytest.mark.parametrize(
    "endpoint, loopback",
    [("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:1", True), ("tcp://localhost:5555", True),
     ("tcp://[::1]:5555", True), ("ipc:///tmp/w.sock", True), ("tcp://0.0.0.0:5555", False),
     ("tcp://*:5555", False), ("tcp://10.0.0.5:5555", False), ("tcp://eth0:5555", False),
     ("tcp://worker.example:5555", False), ("tcp://LOCALHOST:1", True), ("tcp://[::ffff:127.0.0.1]:1", True),
     ("inproc://w", True), ("ws://0.0.0.0:5555", False), ("wss://127.0.0.1:1", False), ("tipc://{5560,0,0}", False),
     ("udp://0.0.0.0:1", False)],
)  # fmt: skip
def test_loopback_endpoints(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_key_pairs_are_owner_only_and_load_back(tmp_path):
    written = write_key_pairs(tmp_path / "keys")
    assert sorted(p.name for p in written) == ["proxy.key", "proxy.key_secret", "worker.key", "worker.key_secret"]
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in written)
    public, secret = load_secret_key(str(tmp_path / "keys" / "worker.key_secret"))
    assert load_public_key(str(tmp_path / "keys" / "worker.key")) == public and len(secret) == 40
    with pytest.raises(FileExistsError):
        write_key_pairs(tmp_path / "keys", ("worker",))  # never overwrites a key
    with pytest.raises(KeyFileError):
        load_secret_key(str(tmp_path / "keys" / "worker.key"))  # a public key has no secret half


def test_the_workers_own_key_admits_nobody(tmp_path):
    write_key_pairs(tmp_path)
    keys = ServerKeys.load(str(tmp_path / "worker.key_secret"), str(tmp_path))
    proxy_public = load_public_key(str(tmp_path / "proxy.key"))
    assert keys.allowed == {proxy_public} and load_allowed_keys(str(tmp_path)) == {proxy_public, keys.public}
    allowed = AllowedClients(keys.allowed)
    assert allowed.callback("*", proxy_public) and not allowed.callback("*", keys.public)


def test_proxy_key_options(tmp_path):
    write_key_pairs(tmp_path)
    remote = ModelSpec("m", None, endpoint="tcp://10.0.0.5:5555")
    local = ModelSpec("local", Path("/models/x"))
    with pytest.raises(ValueError, match="--worker-public-key"):
        with_link_keys((remote,), [], "")
    specs = with_link_keys((local, remote), [f"m={tmp_path / 'worker.key'}"], str(tmp_path / "proxy.key_secret"))
    assert specs[0].link_keys is None
    assert specs[1].link_keys.server_public == load_public_key(str(tmp_path / "worker.key"))
    with pytest.raises(ValueError, match="needs --curve-secret-key"):
        with_link_keys((remote,), [f"m={tmp_path / 'worker.key'}"], "")
    with pytest.raises(ValueError, match="no --worker local"):
        with_link_keys((local,), [f"local={tmp_path / 'worker.key'}"], str(tmp_path / "proxy.key_secret"))


def test_replicas_on_several_machines_each_get_their_own_key(tmp_path):
    write_key_pairs(tmp_path / "a")
    write_key_pairs(tmp_path / "b")
    a = ModelSpec("m", None, endpoint="tcp://10.0.0.5:5555")
    b = ModelSpec("m", None, endpoint="tcp://10.0.0.6:5555")
    secret = str(tmp_path / "a" / "proxy.key_secret")
    keys = [f"m@tcp://10.0.0.5:5555={tmp_path / 'a' / 'worker.key'}", f"m@tcp://10.0.0.6:5555={tmp_path / 'b' / 'worker.key'}"]
    specs = with_link_keys((a, b), keys, secret)
    assert specs[0].link_keys.server_public == load_public_key(str(tmp_path / "a" / "worker.key"))
    assert specs[1].link_keys.server_public == load_public_key(str(tmp_path / "b" / "worker.key"))
    with pytest.raises(ValueError, match="is not on this machine"):  # b has no key of its own, and no NAME=FILE
        with_link_keys((a, b), keys[:1], secret)
    with pytest.raises(ValueError, match="no --worker m=tcp://10.0.0.7:5555"):
        with_link_keys((a, b), [f"m@tcp://10.0.0.7:5555={tmp_path / 'a' / 'worker.key'}"], secret)
    shared = with_link_keys((a, b), [f"m={tmp_path / 'a' / 'worker.key'}"], secret)  # NAME=FILE: every replica
    assert shared[0].link_keys.server_public == shared[1].link_keys.server_public


def test_replica_specs_from_the_command_line(tmp_path):
    from proxy.serve import model_specs

    specs = model_specs([], ["m=tcp://127.0.0.1:5555", "m=tcp://127.0.0.1:5556"], ["alias=m"])
    assert [s.endpoint for s in specs] == ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"]
    assert all("alias" in s.aliases and "default_model" in s.aliases for s in specs)
    with pytest.raises(ValueError, match="endpoint is given twice"):
        model_specs([], ["m=tcp://127.0.0.1:5555", "m=tcp://127.0.0.1:5555"])
    assert len(model_specs([], [], replicas=3)) == 3  # the built-in model, three local workers
