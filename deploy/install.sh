#!/usr/bin/env bash
# Install mlx-cache-proxy as a LaunchAgent of the current user, or remove it.
#
#   deploy/install.sh [--dry-run] [--uninstall] [--venv DIR] [--config FILE] [--log-dir DIR] [--label LABEL]
#
# Install: render the plist (deploy/render_plist.py) into ~/Library/LaunchAgents/LABEL.plist,
# the newsyslog rule into /etc/newsyslog.d/LABEL.conf (sudo), then replace the running service:
# bootout, wait until the old instance has exited, bootstrap, kickstart.
# --uninstall: bootout, wait, remove both files; logs, config and disk cache stay.
# --dry-run: print the rendered files and every command instead of running anything (works on
# Linux too). Written for macOS's /bin/bash 3.2.
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"

# launchd waits ExitTimeOut (180 s in the plist) between SIGTERM and SIGKILL; wait a little longer.
STOP_WAIT=200
BOOTSTRAP_TRIES=10

DRY_RUN=0
UNINSTALL=0
VENV="$REPO_DIR/.venv"
CONFIG="$HOME/.config/mlx-cache-proxy/config.toml"
LOG_DIR=""
LABEL="com.mlx-cache-proxy"

usage() {
    cat <<EOF
usage: $0 [--dry-run] [--uninstall] [--venv DIR] [--config FILE] [--log-dir DIR] [--label LABEL]

  --dry-run      print the rendered plist, newsyslog rule and every command; change nothing
  --uninstall    stop the service and remove its plist and newsyslog rule
  --venv DIR     virtualenv with mlx-cache-proxy installed (default: $REPO_DIR/.venv)
  --config FILE  the service's TOML config (default: ~/.config/mlx-cache-proxy/config.toml)
  --log-dir DIR  log directory (default: ~/Library/Logs/LABEL)
  --label LABEL  launchd label (default: com.mlx-cache-proxy)
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

warn() {
    echo "install.sh: warning: $*" >&2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --venv | --config | --log-dir | --label)
            [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
            case "$1" in
                --venv) VENV="$2" ;;
                --config) CONFIG="$2" ;;
                --log-dir) LOG_DIR="$2" ;;
                --label) LABEL="$2" ;;
            esac
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
    shift
done

[[ "$LABEL" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "label '$LABEL': use letters, digits, '.', '-' and '_'"

absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

VENV="$(absolute "$VENV")"
CONFIG="$(absolute "$CONFIG")"
LOG_DIR="$(absolute "${LOG_DIR:-$HOME/Library/Logs/$LABEL}")"
PLIST_DIR="$HOME/Library/LaunchAgents"
PLIST="$PLIST_DIR/$LABEL.plist"
NEWSYSLOG_CONF="${NEWSYSLOG_DIR:-/etc/newsyslog.d}/$LABEL.conf" # NEWSYSLOG_DIR: for tests
DOMAIN="gui/$UID"
SERVICE="$DOMAIN/$LABEL"

# ----------------------------------------------------------------- running commands

# Run a command, or in a dry run print it (shell-quoted) and succeed.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

as_root() {
    if [[ $EUID -eq 0 ]]; then
        run "$@"
    else
        run sudo "$@"
    fi
}

# put_file TEXT DEST MODE [root]: write TEXT to DEST through a checked temporary file.
put_file() {
    local text="$1" dest="$2" mode="$3" owner="${4:-}"
    if [[ $DRY_RUN -eq 1 ]]; then
        local sudo=""
        [[ -z "$owner" || $EUID -eq 0 ]] || sudo="sudo "
        [[ "$dest" != *.plist ]] || echo "+ plutil -lint <the plist above>"
        echo "+ ${sudo}install -m $mode ${owner:+-o root -g wheel }<the text above> $dest"
        return 0
    fi
    local tmp
    tmp="$(mktemp "${TMPDIR:-/tmp}/mlx-cache-proxy.XXXXXX")"
    printf '%s\n' "$text" >"$tmp"
    if [[ "$dest" == *.plist ]] && command -v plutil >/dev/null 2>&1; then
        plutil -lint "$tmp" >/dev/null || { rm -f "$tmp"; die "plutil rejects the rendered plist"; }
    fi
    if [[ -n "$owner" ]]; then
        as_root install -m "$mode" -o root -g wheel "$tmp" "$dest" || { rm -f "$tmp"; die "cannot install $dest"; }
    else
        install -m "$mode" "$tmp" "$dest" || { rm -f "$tmp"; die "cannot install $dest"; }
    fi
    rm -f "$tmp"
}

# bootout is asynchronous: launchd keeps the label while the old instance drains its requests and
# saves its cache (up to ExitTimeOut), and a bootstrap meanwhile fails with "5: Input/output error".
stop_service() {
    run launchctl bootout "$SERVICE" 2>/dev/null || true
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "# then wait until 'launchctl print $SERVICE' fails: the old instance has exited (at most ${STOP_WAIT}s)"
        return 0
    fi
    local waited=0
    while launchctl print "$SERVICE" >/dev/null 2>&1; do
        [[ $waited -lt $STOP_WAIT ]] || die "$SERVICE is still loaded after ${STOP_WAIT}s; see: launchctl print $SERVICE"
        if [[ $((waited % 10)) -eq 0 ]]; then
            echo "waiting for the running instance to finish its requests and save its cache..."
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

start_service() {
    run launchctl enable "$SERVICE" # undoes an earlier 'launchctl disable', which would block bootstrap
    if [[ $DRY_RUN -eq 1 ]]; then
        run launchctl bootstrap "$DOMAIN" "$PLIST"
    else
        local try=1
        until launchctl bootstrap "$DOMAIN" "$PLIST"; do
            # The label can linger a moment after the old process is gone.
            [[ $try -lt $BOOTSTRAP_TRIES ]] || die "launchctl bootstrap $DOMAIN $PLIST failed $BOOTSTRAP_TRIES times"
            try=$((try + 1))
            sleep 1
        done
    fi
    # RunAtLoad has started it already; this only starts it if it is not running. No -k: that would
    # kill the instance bootstrap just started.
    run launchctl kickstart "$SERVICE" || warn "launchctl kickstart $SERVICE failed; see: launchctl print $SERVICE"
}

# ----------------------------------------------------------------- checks

python_for_rendering() {
    if [[ -x "$VENV/bin/python" ]]; then
        echo "$VENV/bin/python"
    elif command -v python3 >/dev/null 2>&1; then
        command -v python3
    else
        die "no python3 to render the templates with (and no $VENV/bin/python)"
    fi
}

# Problems are fatal for a real install and warnings in a dry run.
problem() {
    if [[ $DRY_RUN -eq 1 ]]; then warn "$*"; else die "$*"; fi
}

check_install() {
    if [[ $DRY_RUN -eq 0 ]] && ! command -v launchctl >/dev/null 2>&1; then
        die "launchctl not found: this installs a macOS LaunchAgent (--dry-run works anywhere)"
    fi
    [[ -x "$VENV/bin/mlx-cache-proxy" ]] ||
        problem "$VENV/bin/mlx-cache-proxy not found; set up the venv: python3 -m venv .venv && .venv/bin/pip install -e ."
    if [[ ! -f "$CONFIG" ]]; then
        problem "no config at $CONFIG; start from the example: mkdir -p $(dirname "$CONFIG") && cp $DEPLOY_DIR/config.example.toml $CONFIG"
        return 0
    fi
    # With KeepAlive, a config the service rejects means a restart every ThrottleInterval: check it now,
    # with the service's own option parser.
    if [[ -x "$VENV/bin/python" ]]; then
        local status=0
        "$VENV/bin/python" - "$CONFIG" <<'EOF' || status=$?
import sys
try:
    from proxy.options import OptionError, resolve
except ImportError as exc:
    print(f"cannot check the config with this venv: {exc}", file=sys.stderr)
    sys.exit(3)
try:
    resolve(["--config", sys.argv[1]], environ={})
except OptionError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
EOF
        case $status in
            0) ;;
            3) warn "config not checked" ;;
            *) problem "the service would refuse $CONFIG (above)" ;;
        esac
    fi
}

# ----------------------------------------------------------------- install / uninstall

install_service() {
    check_install
    local python plist_text newsyslog_text
    python="$(python_for_rendering)"
    plist_text="$("$python" "$DEPLOY_DIR/render_plist.py" \
        --venv "$VENV" --config "$CONFIG" --log-dir "$LOG_DIR" --label "$LABEL")"
    newsyslog_text="$("$python" "$DEPLOY_DIR/render_plist.py" --newsyslog --log-dir "$LOG_DIR")"

    if [[ $DRY_RUN -eq 1 ]]; then
        echo "# dry run: nothing is written or started"
        echo "# ---- $PLIST"
        printf '%s\n' "$plist_text"
        echo "# ---- $NEWSYSLOG_CONF"
        printf '%s\n' "$newsyslog_text"
        echo "# ---- commands"
    fi
    run mkdir -p "$LOG_DIR" "$PLIST_DIR" # launchd does not create the log directory
    put_file "$plist_text" "$PLIST" 644
    put_file "$newsyslog_text" "$NEWSYSLOG_CONF" 644 root
    stop_service
    start_service

    [[ $DRY_RUN -eq 0 ]] || return 0
    cat <<EOF

$LABEL: installed from $PLIST
  status:   launchctl print $SERVICE
  logs:     $LOG_DIR/mlx-cache-proxy.log (launchd's own: stdout.log, stderr.log)
  restart:  launchctl kill SIGTERM $SERVICE   (graceful; launchd starts it again)
  remove:   $0 --uninstall --label $LABEL
EOF
}

uninstall_service() {
    if [[ $DRY_RUN -eq 0 ]] && ! command -v launchctl >/dev/null 2>&1; then
        die "launchctl not found: nothing to uninstall here"
    fi
    stop_service
    run rm -f "$PLIST"
    if [[ -e "$NEWSYSLOG_CONF" || $DRY_RUN -eq 1 ]]; then
        as_root rm -f "$NEWSYSLOG_CONF"
    fi
    [[ $DRY_RUN -eq 0 ]] || return 0
    echo "$LABEL: removed. Left in place: logs in $LOG_DIR, the config $CONFIG and the disk cache."
}

if [[ $UNINSTALL -eq 1 ]]; then
    uninstall_service
else
    install_service
fi
