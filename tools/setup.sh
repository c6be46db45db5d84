#!/usr/bin/env bash
# Idempotent setup for a Debian 12 machine: system packages, then .venv.
#
# Installs with apt-get only the packages that are missing (needs root then),
# without starting their services: tests and the demo start their own
# PostgreSQL clusters and etcd members on free ports. Then creates .venv with
# Python >= 3.11 if absent and installs the project into it (editable, with
# the test extras). Safe to run again.
set -euo pipefail

cd "$(dirname "$0")/.."

# postgresql-15 brings psql, pg_isready and pgbench; Debian 12 has no separate
# postgresql-contrib-15 (contrib is inside postgresql-15). systemd only for
# `systemd-analyze verify` of our units; it is not started. openssl makes the
# certificates of the etcd TLS test; nodejs runs the polkit rule in its test.
packages=(
    postgresql-15 etcd-server etcd-client pgbouncer
    python3-venv python3-dev gcc libffi-dev iproute2 procps systemd
    openssl nodejs
)

say() { echo "setup: $*"; }

# Run a command silently; show its output only if it fails.
quiet() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    ((status == 0)) || cat "$log" >&2
    rm -f "$log"
    return "$status"
}

installed() {
    # grep reads all of dpkg's output (no -q), so pipefail never sees a SIGPIPE.
    dpkg -s "$1" 2>/dev/null | grep '^Status: install ok installed' >/dev/null
}

missing=()
for package in "${packages[@]}"; do
    installed "$package" || missing+=("$package")
done

if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing packages: ${missing[*]}; run this script as root" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    # Keep apt from starting the packaged postgresql/etcd services; we don't use them.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update
    quiet apt-get install -y --no-install-recommends "${missing[@]}"
else
    say "system packages present"
fi

if [[ ! -x .venv/bin/python ]]; then
    python=$(command -v python3.11 || command -v python3 || true)
    if [[ -z $python ]] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "setup: need Python >= 3.11 as python3.11 or python3 (found: ${python:-none})" >&2
        exit 1
    fi
    say "creating .venv with $python"
    "$python" -m venv .venv
fi

say "installing haproxy-ln into .venv"
quiet .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip
quiet .venv/bin/python -m pip install --disable-pip-version-check -e '.[test]'
say "done"
