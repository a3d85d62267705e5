#!/bin/sh
# Build st-credential-proxy from SOURCE into a wheel, then install that wheel with its dependencies into a new virtual
# environment at VENV. The Dockerfile's build stage runs exactly this script, and tests/test_deploy.py runs it too (into
# a temporary directory, then starts the result), so the image gets what the test checked.
#
#   sh deploy/docker/install.sh SOURCE VENV [WHEEL_DIR]
#
# Dependencies come from the package index as binary wheels only (--only-binary): the image has no compiler, and a
# dependency that would need one fails the build instead of slipping in a source build. pip leaves the venv at the end:
# the running proxy never installs anything.
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: $0 SOURCE VENV [WHEEL_DIR]" >&2
    exit 2
fi
source_dir=$1
venv=$2
wheels=${3:-"$venv.wheels"}
python=${PYTHON:-python3}

"$python" -m pip wheel --no-deps --wheel-dir "$wheels" "$source_dir"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --only-binary=:all: "$wheels"/st_credential_proxy-*.whl
"$venv/bin/python" -m pip uninstall --yes pip
"$venv/bin/st-proxy" --version
