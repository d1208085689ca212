"""deploy/: the launchd plist, install.sh, newsyslog rule, Prometheus and Grafana files.

None of this needs macOS: the plist is checked with plistlib, install.sh runs in --dry-run
(and once for real against a fake launchctl), and every metric a dashboard or alert names
must be one that proxy/metrics.py exports.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import plistlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "install.sh"
LABEL = "com.mlx-cache-proxy"
METRIC = re.compile(r"mlx_cache_proxy_[a-z_]+")


def _load_renderer():
    spec = importlib.util.spec_from_file_location("render_plist", DEPLOY / "render_plist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


def rendered_plist(venv="/opt/mlx/venv", config="/Users/me/.config/mlx-cache-proxy/config.toml",
                   log_dir="/Users/me/Library/Logs/com.mlx-cache-proxy", label=LABEL) -> dict:
    text = render.render_plist(render.plist_values(venv, config, log_dir, label))
    return plistlib.loads(text.encode())


def run_install(*args: str, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(home.parent)}
    environ.update(env or {})
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, env=environ,
                          cwd=REPO, timeout=60)


# ----------------------------------------------------------------- the plist


def test_plist_has_the_keys_launchd_needs_with_the_right_types():
    plist = rendered_plist()

    assert plist["Label"] == LABEL
    arguments = plist["ProgramArguments"]
    assert isinstance(arguments, list) and all(isinstance(a, str) for a in arguments)
    assert arguments == ["/opt/mlx/venv/bin/mlx-cache-proxy", "serve", "--config",
                         "/Users/me/.config/mlx-cache-proxy/config.toml"]
    assert plist["RunAtLoad"] is True
    assert isinstance(plist["KeepAlive"], (bool, dict))
    assert type(plist["ThrottleInterval"]) is int and plist["ThrottleInterval"] >= 10
    assert plist["ProcessType"] == "Interactive"
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert isinstance(plist[key], str)
        assert plist[key].startswith("/Users/me/Library/Logs/com.mlx-cache-proxy/")
    assert plist["WorkingDirectory"] == "/Users/me/.config/mlx-cache-proxy"
    environment = plist["EnvironmentVariables"]
    assert isinstance(environment, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in environment.items())
    assert environment["PATH"].startswith("/opt/mlx/venv/bin:")
    assert environment["MLX_CACHE_PROXY_LOG_FILE"] == "/Users/me/Library/Logs/com.mlx-cache-proxy/mlx-cache-proxy.log"
    assert type(plist["ExitTimeOut"]) is int
    for limits in ("SoftResourceLimits", "HardResourceLimits"):
        assert type(plist[limits]["NumberOfFiles"]) is int


def test_a_port_in_use_is_retried_cheaply_and_stderr_stays_small():
    """Port taken: serve exits 3 before loading anything; KeepAlive retries it once per ThrottleInterval."""
    from proxy.listener import EXIT_PORT_IN_USE
    from proxy.options import BY_NAME

    plist = rendered_plist()
    assert plist["KeepAlive"] is True  # any exit restarts, 3 included: the port frees when the old instance ends
    assert plist["ThrottleInterval"] >= 10  # one attempt (under a second, no model load) per 10 s at most
    assert EXIT_PORT_IN_USE == 3 and "code 3" in (DEPLOY / "README.md").read_text()
    level = plist["EnvironmentVariables"]["MLX_CACHE_PROXY_STDERR_LEVEL"]
    assert level == "warning" and BY_NAME["stderr_level"].parse(level) == "warning"


def test_plist_paths_are_absolute_and_xml_special_characters_survive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plist = rendered_plist(venv="venv & <co>", config="conf/config.toml", log_dir="logs", label="org.example.llm")

    assert plist["Label"] == "org.example.llm"
    assert plist["ProgramArguments"][0] == f"{tmp_path}/venv & <co>/bin/mlx-cache-proxy"
    assert plist["ProgramArguments"][3] == f"{tmp_path}/conf/config.toml"
    assert plist["StandardErrorPath"] == f"{tmp_path}/logs/stderr.log"


def test_a_label_that_is_not_a_file_name_is_refused():
    with pytest.raises(render.RenderError):
        render.plist_values("/v", "/c.toml", "/l", label="../evil label")


def test_template_and_values_must_match_exactly():
    with pytest.raises(render.RenderError, match="no value"):
        render.fill("<string>{{VENV}}</string>", {})
    with pytest.raises(render.RenderError, match="no placeholder"):
        render.fill("<string>x</string>", {"VENV": "/v"})


def _assigned_number(path: Path, name: str) -> float:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return float(ast.literal_eval(node.value))
    raise AssertionError(f"{name} not found in {path}")


def test_exit_timeout_leaves_room_to_drain_requests_and_save_the_cache():
    """launchd's SIGKILL must not land while workers still write their pools to the disk tier."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    config = tomllib.loads((DEPLOY / "config.example.toml").read_text())
    worker_stop = _assigned_number(REPO / "worker/io_loop.py", "STOP_GRACE_S") + _assigned_number(
        REPO / "worker/main.py", "DISK_SAVE_GRACE_S"
    )
    exit_timeout = rendered_plist()["ExitTimeOut"]

    assert exit_timeout > config["shutdown_timeout"] + worker_stop
    wait = int(re.search(r"^STOP_WAIT=(\d+)$", INSTALL.read_text(), re.M).group(1))
    assert wait > exit_timeout, "install.sh must wait out launchd's ExitTimeOut before bootstrap"


# ----------------------------------------------------------------- the example config


def test_example_config_is_accepted_by_the_serve_option_parser():
    from proxy.options import resolve

    values = resolve(["--config", str(DEPLOY / "config.example.toml")], environ={})

    assert values["host"] == "127.0.0.1"
    assert values["model"] and values["cache_bytes"] > 0 and values["memory_limit"] > values["cache_bytes"]


def test_the_plist_log_file_wins_over_the_config():
    from proxy.options import resolve

    log_file = rendered_plist()["EnvironmentVariables"]["MLX_CACHE_PROXY_LOG_FILE"]
    values = resolve(["--config", str(DEPLOY / "config.example.toml")],
                     environ={"MLX_CACHE_PROXY_LOG_FILE": log_file})

    assert values["log_file"] == log_file


# ----------------------------------------------------------------- newsyslog


def newsyslog_rules(log_dir="/Users/me/Library/Logs/com.mlx-cache-proxy") -> list[list[str]]:
    text = render.render_newsyslog(render.newsyslog_values(log_dir, "me:staff"))
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_newsyslog_rules_have_the_seven_fields_and_signal_nobody():
    rules = newsyslog_rules()

    assert rules
    for fields in rules:
        # logfilename owner:group mode count size when flags (no pid file: N)
        assert len(fields) == 7, fields
        path, owner, mode, count, size, when, flags = fields
        assert path.startswith("/") and owner == "me:staff"
        assert re.fullmatch(r"[0-7]{3}", mode) and count.isdigit() and size.isdigit()
        assert when == "*"
        assert "N" in flags


def test_newsyslog_rotates_exactly_the_files_the_plist_writes():
    plist = rendered_plist()
    rotated = {fields[0]: fields[6] for fields in newsyslog_rules()}

    log_file = plist["EnvironmentVariables"]["MLX_CACHE_PROXY_LOG_FILE"]
    assert set(rotated) == {log_file, plist["StandardOutPath"], plist["StandardErrorPath"]}
    assert "B" in rotated[log_file]  # no "turned over" line in a JSON log
    # launchd keeps its files open: compressing them would unlink a file still being written.
    assert "Z" not in rotated[plist["StandardErrorPath"]] and "J" not in rotated[plist["StandardErrorPath"]]


def test_newsyslog_refuses_a_log_dir_with_spaces():
    with pytest.raises(render.RenderError):
        render.newsyslog_values("/Users/me/Library/Application Support/logs", "me:staff")


# ----------------------------------------------------------------- install.sh


def test_dry_run_prints_the_plist_and_launchctl_commands_and_touches_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    calls = tmp_path / "calls"
    bin_dir = _fake_commands(tmp_path, calls)

    result = run_install("--dry-run", home=home, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})

    assert result.returncode == 0, result.stderr
    uid = os.getuid()
    plist_path = home / "Library/LaunchAgents" / f"{LABEL}.plist"
    assert f"launchctl bootout gui/{uid}/{LABEL}" in result.stdout
    assert f"launchctl bootstrap gui/{uid} {plist_path}" in result.stdout
    assert f"launchctl kickstart gui/{uid}/{LABEL}" in result.stdout
    assert result.stdout.index("bootout") < result.stdout.index("bootstrap")
    assert "<key>ProgramArguments</key>" in result.stdout
    assert f"/etc/newsyslog.d/{LABEL}.conf" in result.stdout
    assert list(home.iterdir()) == []
    assert not calls.exists(), calls.read_text()  # no launchctl, sudo, install or plutil ran


def test_dry_run_uninstall_prints_bootout_and_removal(tmp_path):
    home = tmp_path / "home"
    home.mkdir()

    result = run_install("--dry-run", "--uninstall", "--label", "org.example.llm", home=home)

    assert result.returncode == 0, result.stderr
    assert f"launchctl bootout gui/{os.getuid()}/org.example.llm" in result.stdout
    assert f"rm -f {home}/Library/LaunchAgents/org.example.llm.plist" in result.stdout
    assert "bootstrap" not in result.stdout
    assert list(home.iterdir()) == []


def test_install_refuses_a_config_the_service_would_reject(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "config.toml"
    config.write_text('port = 8080\nprot = 9000\n')
    bin_dir = _fake_commands(tmp_path, tmp_path / "calls")

    result = run_install("--config", str(config), "--venv", str(REPO / ".venv"), home=home,
                         env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "NEWSYSLOG_DIR": str(tmp_path)})

    assert result.returncode != 0
    assert "prot" in result.stderr
    assert list(home.iterdir()) == [] and not (tmp_path / "calls").exists()


def test_install_waits_for_the_old_instance_then_bootstraps_and_uninstall_removes(tmp_path):
    """For real, against a fake launchctl that drains slowly and fails the first bootstrap with EIO."""
    home = tmp_path / "home"
    home.mkdir()
    calls = tmp_path / "calls"
    bin_dir = _fake_commands(tmp_path, calls)
    config = tmp_path / "config.toml"
    config.write_text((DEPLOY / "config.example.toml").read_text())
    newsyslog_dir = tmp_path / "newsyslog.d"
    newsyslog_dir.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "NEWSYSLOG_DIR": str(newsyslog_dir)}

    result = run_install("--config", str(config), "--venv", str(REPO / ".venv"), home=home, env=env)

    assert result.returncode == 0, result.stderr
    plist_path = home / "Library/LaunchAgents" / f"{LABEL}.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["ProgramArguments"][3] == str(config)
    assert (home / "Library/Logs" / LABEL).is_dir()
    assert (newsyslog_dir / f"{LABEL}.conf").read_text().count("mlx-cache-proxy.log") >= 1
    uid = os.getuid()
    launchctl = [c for c in calls.read_text().splitlines() if c.startswith("launchctl")]
    assert launchctl == [
        f"launchctl bootout gui/{uid}/{LABEL}",
        *[f"launchctl print gui/{uid}/{LABEL}"] * 3,  # draining twice, then gone
        f"launchctl enable gui/{uid}/{LABEL}",
        f"launchctl bootstrap gui/{uid} {plist_path}",  # EIO: the label lingers
        f"launchctl bootstrap gui/{uid} {plist_path}",
        f"launchctl kickstart gui/{uid}/{LABEL}",
    ]

    result = run_install("--uninstall", home=home, env=env)

    assert result.returncode == 0, result.stderr
    assert not plist_path.exists() and not (newsyslog_dir / f"{LABEL}.conf").exists()


def _fake_commands(tmp_path: Path, calls: Path) -> Path:
    """launchctl, plutil, sudo, install and sleep stand-ins that log their calls to `calls`."""
    bin_dir = tmp_path / "bin"
    state = tmp_path / "launchd-state"
    bin_dir.mkdir()
    state.mkdir()
    scripts = {
        "launchctl": f"""
            echo "launchctl $*" >> "{calls}"
            case "$1" in
                bootout) echo 2 > "{state}/draining" ;;
                print)
                    left=$(cat "{state}/draining" 2>/dev/null || echo 0)
                    [ "$left" -gt 0 ] || exit 113
                    echo $((left - 1)) > "{state}/draining"
                    echo "state = SIGTERMed" ;;
                bootstrap)
                    if [ ! -e "{state}/eio" ]; then
                        touch "{state}/eio"; echo "Bootstrap failed: 5: Input/output error" >&2; exit 5
                    fi ;;
            esac
            exit 0""",
        "plutil": f"""
            echo "plutil $*" >> "{calls}"
            exec {sys.executable} -c 'import plistlib, sys; plistlib.load(open(sys.argv[-1], "rb"))' "$@" """,
        "sudo": f"""echo "sudo $*" >> "{calls}"; exec "$@" """,
        # Real install(1) with -o root -g wheel would need root and a wheel group.
        "install": f"""
            echo "install $*" >> "{calls}"
            for last; do :; done
            cp "${{@: -2:1}}" "$last" """,
        "sleep": "exit 0",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + "\n".join(line.strip() for line in body.splitlines()) + "\n")
        path.chmod(0o755)
    return bin_dir


# ----------------------------------------------------------------- monitoring


def exported_metric_names() -> set[str]:
    """Every sample name /metrics can carry: counters with _total, histograms with their three."""
    from protocol.messages import DiskStats, MemoryStats, PoolStats
    from proxy.metrics import Metrics, WorkerView

    metrics = Metrics()
    metrics.watch_workers(lambda: [WorkerView("m", 0, 0, 0, PoolStats(disk=DiskStats()), MemoryStats())])
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def _grafana_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in inner.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_grafana_dashboard_uses_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana/mlx-cache-proxy.json").read_text())
    exported = exported_metric_names()

    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model_query = variables["model"]["query"]
    assert "label_values(mlx_cache_proxy_requests_total, model)" in json.dumps(model_query)
    exprs = _grafana_exprs(dashboard)
    assert len(exprs) > 20
    referenced = {name for expr in exprs for name in METRIC.findall(expr)}
    assert referenced - exported == set()
    # The panels the operator needs, by the metric that drives each.
    for needed in ("cache_hits_total", "cached_tokens_total", "time_to_first_token_seconds_bucket",
                   "pool_capacity_bytes", "mlx_peak_memory_bytes", "queue_depth", "guard_rejections_total",
                   "worker_restarts_total", "disk_bytes", "disk_hits_total"):
        assert f"mlx_cache_proxy_{needed}" in referenced
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def _yaml():
    return pytest.importorskip("yaml")


def test_prometheus_config_scrapes_the_proxy_and_loads_the_alerts():
    yaml = _yaml()
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())

    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mlx-cache-proxy"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_alert_rules_are_well_formed_and_use_only_exported_metrics():
    yaml = _yaml()
    rules = [r for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"] for r in g["rules"]]
    exported = exported_metric_names()

    assert len(rules) >= 5
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert set(METRIC.findall(rule["expr"])) - exported == set(), rule["alert"]
    referenced = {name for r in rules for name in METRIC.findall(r["expr"])}
    for needed in ("worker_restarts_total", "cache_hits_total", "queue_depth", "mlx_active_memory_bytes",
                   "guard_rejections_total"):
        assert f"mlx_cache_proxy_{needed}" in referenced
