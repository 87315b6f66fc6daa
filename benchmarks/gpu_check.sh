#!/usr/bin/env bash
# The one GPU check (see benchmarks/gpu_check.py): full-size training step at 8 samples per GPU, 512 px, bf16,
# SDPA, eager and torch.compile, with and without precomputed latents, and DDIM-50 sampling, as one table.
#
#   benchmarks/gpu_check.sh              # on one H100 / H200 / A100; stops itself after GPU_CHECK_LIMIT_S
#   benchmarks/gpu_check.sh --dry-run    # the same code on a CPU with the tiny model (CI runs this)
#
# Environment: PYTHON (default: python), GPU_CHECK_LIMIT_S (default 460: under 8 minutes with the start),
# OUT (a folder: the table is also written to $OUT/gpu_check.md). Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
python_bin="${PYTHON:-python}"
limit="${GPU_CHECK_LIMIT_S:-460}"
log="${OUT:-${TMPDIR:-/tmp}}/gpu_check.md"
mkdir -p "$(dirname "$log")"
if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# SIGINT at the limit: gpu_check.py prints the rows it has measured and exits 124; SIGKILL 20 s later.
status=0
timeout --signal=INT --kill-after=20 "$limit" "$python_bin" benchmarks/gpu_check.py "$@" \
    | tee "$log" || status=$?
echo "table also in $log (exit status $status)" >&2
exit "$status"
