#!/usr/bin/env bash
# Create (or update) a virtual environment with revgan-med installed.
# Usage: scripts/setup_env.sh VENV_DIR [EXTRAS]
# Picks the PyTorch build: CUDA where an NVIDIA GPU is visible, otherwise the CPU build
# (an unpinned `pip install torch` on Linux pulls several GB of CUDA libraries).
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
torch_version=${TORCH_VERSION:-2.13.0}
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip

if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found, installing the CUDA build of torch==$torch_version"
        "$py" -m pip install -q "torch==$torch_version"
    elif "$py" -c "import urllib.request as u; u.urlopen('$cpu_index/', timeout=5)" 2>/dev/null; then
        echo "setup: no NVIDIA GPU, installing the CPU build of torch==$torch_version"
        "$py" -m pip install -q "torch==$torch_version" --index-url "$cpu_index"
    else
        # No PyTorch CPU index reachable: a local wheel (pip's find-links) or PyPI's build is used.
        echo "setup: no NVIDIA GPU and no CPU wheel index reachable, installing torch==$torch_version from the configured index"
        "$py" -m pip install -q "torch==$torch_version"
    fi
fi
target="."
[ -z "$extras" ] || target=".[$extras]"
"$py" -m pip install -q -e "$target"
"$py" -c "import torch, revgan_med; print(f'setup: revgan-med {revgan_med.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
