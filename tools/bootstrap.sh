#!/usr/bin/env bash
# Set up everything the demo, the tests and bench/ need, on a fresh machine or
# an old one: Python >= 3.11 with venv, ./.venv with edge-agent installed in
# editable mode (plus the test extras), and the system tools the tests drive
# (mosquitto, mosquitto_pub, openssl, systemd-analyze, socat, node, chromium,
# PostgreSQL's server binaries).
#
# Idempotent: a second run checks and does nothing. As root on Debian/Ubuntu
# it installs missing system packages with apt-get; otherwise it prints the
# exact command to run and exits 1. It never starts or stops a service. (The
# Debian mosquitto package may start the system broker on 1883 when installed:
# harmless, and nothing here relies on it: tests start their own brokers on
# free ports.)
#
# Used by `make test`, `make demo`, `make bench` and .ci/run.
# Environment: PYTHON=/path/to/python3.x to choose the interpreter for a new venv.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV="$ROOT/.venv"
MIN_PY=(3 11)
# Written after a successful pip install; holds a hash of what was installed
# from, so an unchanged checkout skips pip entirely.
STAMP="$VENV/.edge-agent-bootstrap"

# "command:Debian package" for each system tool the suite uses.
SYSTEM_TOOLS=(
    "mosquitto:mosquitto"                # private brokers started by the tests
    "mosquitto_pub:mosquitto-clients"    # the bench baseline (mosquitto_pub -q 1)
    "openssl:openssl"                    # throwaway CA and certificates for the TLS tests
    "systemd-analyze:systemd"            # tests/test_systemd.py: unit verify + security score
    "socat:socat"                        # ptys standing in for serial devices
    "node:nodejs"                        # the independent offline ZPL renderer (printer tests)
    "npm:npm"
    "chromium:chromium"                  # headless browser for tests/test_browser.py (Playwright)
)
# Fonts the page's screenshots render with; a package, not a command, so checked apart.
SYSTEM_FILES=(
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf:fonts-dejavu-core"
)

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# An executable regular file on PATH or in the sbin directories (mosquitto
# lives in /usr/sbin, which a non-root PATH often lacks). Not `command -v`:
# bash falls back to a non-executable file of that name.
have() {
    local dir
    local IFS=:
    for dir in $PATH /usr/local/sbin /usr/sbin /sbin; do
        [ -n "$dir" ] && [ -f "$dir/$1" ] && [ -x "$dir/$1" ] && return 0
    done
    return 1
}

APT_UPDATED=0
# Install Debian packages, or say exactly how to.
apt_install() {
    local cmd="apt-get install -y --no-install-recommends $*"
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1; then
            log "missing system packages: $*"
            log "run this, then run $0 again:"
            printf '  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive %s\n' "$cmd" >&2
        else
            log "missing system packages (Debian names): $*"
            log "install the equivalents with your distribution's package manager, then run $0 again"
        fi
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq </dev/null >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "$cmd"
    # -qq keeps apt's progress out of the CI log; errors still go to stderr.
    apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null \
        || die "apt-get install $* failed"
}

py_ok() {  # usable for a new venv: version >= MIN_PY and venv + ensurepip importable
    "$1" -c "import sys, venv, ensurepip; sys.exit(sys.version_info < (${MIN_PY[0]}, ${MIN_PY[1]}))" \
        >/dev/null 2>&1
}

py_new_enough() {
    "$1" -c "import sys; sys.exit(sys.version_info < (${MIN_PY[0]}, ${MIN_PY[1]}))" >/dev/null 2>&1
}

find_python() {
    local c
    # The default python3 first (what everyone else here runs), then newer ones.
    for c in ${PYTHON:-} python3 python3.11 python3.12 python3.13 /usr/bin/python3; do
        if command -v "$c" >/dev/null 2>&1 && py_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

venv_ok() { [ -x "$VENV/bin/python" ] && py_new_enough "$VENV/bin/python"; }

# --- 1. System packages (one apt-get update, one apt-get install) ----------
missing=()
for entry in "${SYSTEM_TOOLS[@]}"; do
    have "${entry%%:*}" || missing+=("${entry#*:}")
done
for entry in "${SYSTEM_FILES[@]}"; do
    [ -e "${entry%%:*}" ] || missing+=("${entry#*:}")
done
# PostgreSQL's server binaries, for the HQ store tests (agent/testing/localpg.py runs its
# own initdb on a free port). Debian's package would also create and start a
# "main" cluster on 5432; a createcluster.d file stops that, since this script
# never starts a service. Only when the server is not installed yet.
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && [ -d /etc ]; then
        mkdir -p /etc/postgresql-common/createcluster.d
        if [ ! -e /etc/postgresql-common/createcluster.d/edge-agent.conf ]; then
            printf '%s\n' "# tools/bootstrap.sh (edge-agent): no default cluster; tests run their own" \
                "create_main_cluster = false" \
                >/etc/postgresql-common/createcluster.d/edge-agent.conf
        fi
    fi
    missing+=(postgresql)
fi
PY=""
if ! venv_ok; then
    if ! PY=$(find_python); then
        # Debian 12's python3 is 3.11; python3-venv brings ensurepip.
        py_ver_pkg="python3-venv"
        if command -v python3 >/dev/null 2>&1 && py_new_enough python3; then
            py_ver_pkg="python3-venv python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        fi
        # shellcheck disable=SC2206  # word splitting of the package list is intended
        missing+=(python3 $py_ver_pkg)
    fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi
for entry in "${SYSTEM_TOOLS[@]}"; do
    have "${entry%%:*}" || die "${entry%%:*} still missing after installing ${entry#*:}"
done

# --- 2. The virtualenv ------------------------------------------------------
if ! venv_ok; then
    if [ -z "$PY" ]; then
        PY=$(find_python) || die "no Python >= ${MIN_PY[0]}.${MIN_PY[1]} with venv found; install python3 (>= ${MIN_PY[0]}.${MIN_PY[1]}) and python3-venv"
    fi
    if [ -e "$VENV" ]; then
        log "$VENV is broken or too old: recreating it with $PY"
    else
        log "creating $VENV with $PY ($("$PY" --version 2>&1))"
    fi
    "$PY" -m venv --clear "$VENV" || die "python -m venv failed"
    rm -f "$STAMP"
fi

# --- 3. edge-agent and its test extras, editable ------------------------------
want_stamp=$(cat pyproject.toml <("$VENV/bin/python" --version 2>&1) | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && [ -x "$VENV/bin/edge-agent" ] \
        && "$VENV/bin/python" -c "import agent" >/dev/null 2>&1; then
    :  # installed from this very pyproject.toml: nothing to do
else
    log "pip install -e '.[test]' (into $VENV)"
    pip_log=$(mktemp)
    pip_rc=0
    # -q hides the progress; pip still prints every error and warning.
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -e '.[test]' \
        </dev/null >"$pip_log" 2>&1 || pip_rc=$?
    # Everything pip said, less one harmless line per package when a machine's
    # pip.conf names a local index folder that is absent.
    grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" \
        "$pip_log" >&2 || true
    rm -f "$pip_log"
    [ "$pip_rc" -eq 0 ] || die "pip install -e '.[test]' failed (exit $pip_rc; see the errors above)"
    printf '%s\n' "$want_stamp" >"$STAMP"
fi

# --- 4. The independent ZPL renderer (tests/test_printer_zpl_render.py) --------
# zpl-renderer-js is a WebAssembly build of Zebrash that renders ZPL offline;
# it lives under .venv so it goes away with the venv. Pinned: golden renders.
ZPL_DIR="$VENV/zpl-renderer"
if [ ! -d "$ZPL_DIR/node_modules/zpl-renderer-js" ]; then
    log "npm install zpl-renderer-js@3.4.0 (into $ZPL_DIR)"
    npm install --prefix "$ZPL_DIR" --no-save --no-audit --no-fund --loglevel=error \
        zpl-renderer-js@3.4.0 </dev/null >&2 || die "npm install zpl-renderer-js failed"
fi

log "ready: $("$VENV/bin/python" --version 2>&1) in .venv; mosquitto, openssl, systemd-analyze, socat, node, chromium, postgresql present"
