"""Start-up: the listening sockets are bound first, and the log levels of stderr and the log file."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from proxy.config import ModelSpec, WorkerOptions
from proxy.listener import ListenError, bind_sockets
from proxy.logs import setup_logging
from proxy.supervisor import worker_argv


def test_a_port_in_use_is_a_listen_error_saying_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"port {port} is in use") as caught:
            bind_sockets("127.0.0.1", port)
        assert caught.value.in_use


def test_a_free_port_is_bound_but_not_yet_listening():
    sockets = bind_sockets("127.0.0.1", 0)
    try:
        port = sockets[0].getsockname()[1]
        assert port > 0
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))  # refused until the workers are up and it listens
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("host, message", [("203.0.113.9", "not an address of this machine"),
                                           ("no-such-host.invalid", "cannot listen on --host")])
def test_an_address_that_cannot_be_used_is_not_called_in_use(host, message):
    with pytest.raises(ListenError, match=message) as caught:
        bind_sockets(host, 0)
    assert not caught.value.in_use


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _emit_both(log_file, capsys) -> tuple[str, str]:
    logging.getLogger("mlx_cache_proxy").info("an info line")
    logging.getLogger("mlx_cache_proxy").warning("a warning line")
    for handler in logging.getLogger().handlers:
        handler.flush()
    return capsys.readouterr().err, log_file.read_text()


def test_with_a_log_file_stderr_keeps_the_chosen_level(tmp_path, capsys, restore_logging):
    log_file = tmp_path / "proxy.log"
    setup_logging("info", "text", str(log_file))
    err, text = _emit_both(log_file, capsys)
    assert "an info line" in err and "an info line" in text and "a warning line" in err


def test_stderr_level_raises_only_stderr(tmp_path, capsys, restore_logging):
    log_file = tmp_path / "proxy.log"
    setup_logging("info", "text", str(log_file), stderr_level="warning")
    err, text = _emit_both(log_file, capsys)
    assert "an info line" not in err and "a warning line" in err
    assert "an info line" in text and "a warning line" in text


def test_workers_get_the_stderr_level():
    spec = ModelSpec("m", Path("/models/m"))
    argv = worker_argv(spec, WorkerOptions(log_file="/tmp/x.log", stderr_level="warning"), "ipc:///tmp/w.sock")
    assert argv[argv.index("--stderr-level") + 1] == "warning" and "--log-file" in argv
    assert "--stderr-level" not in worker_argv(spec, WorkerOptions(), "ipc:///tmp/w.sock")
