#!/usr/bin/env bash
# Create .venv in the repo root and install pgps-tune with its test and benchmark extras
# (editable).  With arguments, install those instead, e.g. a built wheel; PGPS_VENV names
# another virtual environment to create (CI installs the wheel into a fresh one this way).
#
# torch is installed first, on purpose: with a visible NVIDIA GPU the default (CUDA) wheel;
# without one a CPU-only wheel, never the multi-GB CUDA build.  Where the package index would
# serve a CUDA wheel to a machine without a GPU, set PGPS_TORCH_CPU_INDEX to a PyTorch CPU
# wheel index and rerun; the script refuses rather than download the wrong build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${PGPS_TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}
VENV=${PGPS_VENV:-.venv}
install=(-e ".[dev,bench]")
if [ $# -gt 0 ]; then install=("$@"); fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
pip_install() {  # pip install, without the noise of this machine's unused local index entries
  "${pip[@]}" install "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    pip_install "torch==$TORCH_VERSION"
  else
    index=()
    [ -n "${PGPS_TORCH_CPU_INDEX:-}" ] && index=(--index-url "$PGPS_TORCH_CPU_INDEX")
    report=$(mktemp)
    "${pip[@]}" install --dry-run --no-deps --report "$report" "${index[@]}" "torch==$TORCH_VERSION" 2>/dev/null
    if ! grep -q '%2Bcpu\|+cpu' "$report"; then
      echo "setup: no GPU here, but the package index offers a CUDA build of torch==$TORCH_VERSION;" \
           "set PGPS_TORCH_CPU_INDEX to a PyTorch CPU wheel index and rerun" >&2
      rm -f "$report"
      exit 1
    fi
    rm -f "$report"
    echo "setup: no GPU, installing torch==$TORCH_VERSION (CPU build)"
    pip_install "${index[@]}" "torch==$TORCH_VERSION"
  fi
fi
# torch stays pinned: without the pin, a dependency that wants a newer torch (nnunetv2's timm pulls
# torchvision, whose newest release wants the newest torch) would replace the CPU build with a CUDA one.
pip_install "${install[@]}" "torch==$TORCH_VERSION"
# nnunetv2's dependencies (timm) pull PyPI's torchvision, whose compiled part links CUDA torch's libraries and
# fails to import beside a CPU build ("operator torchvision::nms does not exist"). nnU-Net's trainer lookup by
# name (nnUNetv2_train -tr, nnUNetv2_predict) imports it, so put the CPU build of the same version in its place,
# from the CPU index (--no-deps: torch stays as it is). Offline, remove the broken one and say what to run.
tv_imports() { "$VENV/bin/python" -c "import torchvision" 2>/dev/null; }
cpu_torch() { "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; }
tv=$({ "$VENV/bin/python" -m pip show torchvision 2>/dev/null || true; } | sed -n 's/^Version: //p')
if [ -n "$tv" ] && ! tv_imports; then
  tv=${tv%%+*}
  cpu_index=${PGPS_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
  cpu_tv=(--no-deps --force-reinstall --index-url "$cpu_index" "torchvision==$tv+cpu")
  if cpu_torch && pip_install "${cpu_tv[@]}" >/dev/null 2>&1 && tv_imports; then
    echo "setup: installed torchvision $tv+cpu from $cpu_index in place of PyPI's, which needs a CUDA torch"
  else
    "${pip[@]}" uninstall -y torchvision
    echo "setup: warning: removed torchvision $tv, which does not import beside torch $TORCH_VERSION;" \
         "nnU-Net's nnUNetv2_train -tr and nnUNetv2_predict need it ('pgps-tune nnunet-train' does not)" >&2
    if cpu_torch; then
      echo "setup: to install the CPU build later: $VENV/bin/python -m pip install ${cpu_tv[*]}" >&2
    fi
  fi
fi
"$VENV/bin/python" -c "import torch, monai, ray, optuna, pyarrow; print('setup: ok, torch', torch.__version__)"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" \
    || { echo "setup: a CUDA build of torch was installed on a machine without a GPU; this is a bug, please report it" >&2; exit 1; }
fi
