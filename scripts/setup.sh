#!/usr/bin/env bash
# Create .venv and install napari-bulbseg into it, with torch pinned by constraints.txt.
#   bash scripts/setup.sh          core engine + CLI (headless)
#   bash scripts/setup.sh test     + napari, Qt, and the test tools (and Xvfb's system packages)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-core}"
VENV="${VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$what" = "test" ] && command -v apt-get >/dev/null 2>&1; then
  pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxkbcommon-x11-0"
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: installing Xvfb and Qt's X11 libraries (apt)" >&2
      apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    else
      echo "setup: GUI tests need: sudo apt-get install $pkgs" >&2
    fi
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.bulbseg-$what"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing napari-bulbseg ($what) into $VENV" >&2
  "$VENV/bin/python" -m pip install -q -c constraints.txt torch 2>&1 | grep -v "is ignored" || true
  extras=""
  [ "$what" = "test" ] && extras="[all,test,distributed]"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".$extras" 2>&1 | grep -v "is ignored" || true
  if [ "$what" = "test" ]; then  # its own pin on bioimageio.spec is too old (see pyproject)
    "$VENV/bin/python" -m pip install -q --no-deps "bioimageio.core==0.11.0" 2>&1 | grep -v "is ignored" || true
  fi
  "$VENV/bin/python" -c "import napari_bulbseg, torch, safetensors, tifffile" || {
    echo "setup: the install failed (see pip's messages above)" >&2; exit 1; }
  [ "$what" = "test" ] && "$VENV/bin/python" -c "import napari, pytest, pytestqt" 
  touch "$stamp"
fi
