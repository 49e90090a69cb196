#!/usr/bin/env bash
# Sets up a fresh clone: a virtual environment at .venv with tf_consreg and its
# test extras, and the offline Fashion-MNIST files (Debian's
# dataset-fashion-mnist) when running as root. Safe to run again: it only
# reinstalls when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=".venv/.tf_consreg-installed-$(sha256sum setup.py | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing tf_consreg and its test extras into .venv (TensorFlow is large: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  rm -f .venv/.tf_consreg-installed-*
  touch "$stamp"
fi

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing from $FMNIST_DIR. Install it with" >&2
    echo "         sudo apt-get install dataset-fashion-mnist" >&2
    echo "       or download the four IDX files and pass --data_dir=<their directory> to the binaries." >&2
    exit 1
  fi
fi
echo "setup: done (.venv ready, Fashion-MNIST in $FMNIST_DIR)"
