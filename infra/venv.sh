#!/usr/bin/env bash
# Build the project's virtual environment: infra/venv.sh VENV CONSTRAINTS EXTRAS
#
# The ~270 packages install with uv (parallel downloads and unpacking, bytecode compiled as pip does: under 2 minutes
# here, against ~5.5 with pip),
# given the same sources pip would use: this machine's pip configuration (index, extra indexes, find-links,
# constraint files, certificate; `pip config list`) is translated into uv's options, and pip's resolution
# across indexes is kept (--index-strategy unsafe-best-match). Where uv cannot be installed or fails,
# plain pip does the same install.
set -euo pipefail
VENV=${1:?usage: infra/venv.sh VENV CONSTRAINTS EXTRAS}
CONSTRAINTS=${2:?usage: infra/venv.sh VENV CONSTRAINTS EXTRAS}
EXTRAS=${3:-cpu,dev}
PYTHON=${PYTHON:-python3}
PY="$VENV/bin/python"
# this machine's pip config lists local indexes that warn once per package they do not hold
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

test -x "$PY" || "$PYTHON" -m venv "$VENV"

# uv's options from pip's configuration (all scopes, PIP_* environment variables included)
uv_options() {
    "$PY" -m pip config list 2>/dev/null | "$PY" -c '
import shlex, sys
options = []
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    name, value = key.rpartition(".")[2], shlex.split(value)[0] if value else ""
    flag = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
            "constraint": "--constraint"}.get(name)
    for item in value.split() if flag else ():
        options += [flag, item]
print(shlex.join(options))'
}

install_with_uv() {
    "$PY" -m pip install --quiet uv 2>&1 | quiet
    local cert
    cert=$("$PY" -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -n 1)
    # shellcheck disable=SC2046  # the options are shell-quoted by uv_options
    eval "set -- $(uv_options)"
    if [ -n "$cert" ]; then export SSL_CERT_FILE="$cert"; fi  # pip's certificate bundle, when it names one
    UV_HTTP_TIMEOUT=${UV_HTTP_TIMEOUT:-180} \
        "$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$PY" --index-strategy unsafe-best-match "$@" \
        -c "$CONSTRAINTS" torch torchvision -e ".[$EXTRAS]"
}

install_with_pip() {
    # torch first, pinned (this machine has these wheels on disk); then the project with the constraints
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" torch torchvision 2>&1 | quiet
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" -e ".[$EXTRAS]" 2>&1 | quiet
}

if [ "${VENV_INSTALLER:-uv}" = uv ] && install_with_uv; then
    echo "venv: installed with uv"
else
    echo "venv: installing with pip"
    install_with_pip
fi
# img2dataset pulls in the `dataclasses` backport, which shadows the standard library (see ENVIRONMENT.md)
"$PY" -m pip uninstall --yes --quiet dataclasses 2>/dev/null || true
"$PY" -c "import dataclasses; assert 'site-packages' not in dataclasses.__file__, dataclasses.__file__"
