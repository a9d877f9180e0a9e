#!/usr/bin/env bash
# hf_gr's prepared device check on a GPU machine, run from the repository root: bash scripts/gpu_check.sh
# It runs scripts/gpu_check/gpu_check.py (correctness, throughput, a short CIFAR-10 reproduction, torch.compile).
#
# Needs torch with CUDA, transformers and accelerate; no network and no `datasets`. hf_gr runs from the working tree
# (PYTHONPATH=.), so nothing needs installing; wheels placed in .whl/ are installed to /tmp/site first.
#
# Once, on a machine with the CIFAR-10 parquet files (never commit the data; outputs/ is ignored):
#   python scripts/gpu_check/gpu_check.py --prepare-data outputs/gpu_data --source CIFAR10_PARQUET_DIR
#       # 20,000 train + 5,000 test images, 46 MB: copy outputs/gpu_data to the GPU machine with the tree
#   python scripts/gpu_check/gpu_check.py --dry-run --out /tmp/gpu_check     # the same code on CPU, about a minute
#
# Results go to $OUT (default outputs/gpu_check), 4 files: gpu_check.json (rewritten after every section, so a run
# cut short keeps what finished), gpu_check.log, gpu_check.stdout (everything printed, tracebacks included), env.txt.
#
# Time: the script plans GPU_CHECK_BUDGET_S (default 440 s) and `timeout` stops it 40 s later; imports ~15 s,
# correctness ~60 s, throughput <= 30% of what is left, reproduction <= 240 s, compile the rest. To rerun only
# some sections in less time:
#   GPU_CHECK_BUDGET_S=180 GPU_CHECK_SECTIONS=correctness,throughput bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-outputs/gpu_check}"
budget="${GPU_CHECK_BUDGET_S:-440}"
sections="${GPU_CHECK_SECTIONS:-correctness,throughput,reproduction,compile}"
mkdir -p "$out"

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi || true
    python3 -c 'import sys, torch, transformers, accelerate; print(sys.version); print("torch", torch.__version__,
        "cuda", torch.version.cuda, torch.cuda.is_available()); print("transformers", transformers.__version__,
        "accelerate", accelerate.__version__)'
    ls -l outputs/gpu_data
} >"$out/env.txt" 2>&1

timeout --kill-after=10 $((${budget%.*} + 40)) python3 scripts/gpu_check/gpu_check.py --out "$out" --budget-s "$budget" \
    --sections "$sections" --data outputs/gpu_data/cifar10_subset.npz 2>&1 | tee "$out/gpu_check.stdout"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check.sh: stopped by timeout; $out/gpu_check.json holds the sections that finished"
exit "$rc"
