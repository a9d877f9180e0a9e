#!/usr/bin/env bash
# The one command for the GPU machine: hf_gr's prepared device check (scripts/gpu_check.py).
#
# The machine: one H200, Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15; no network, no
# `datasets`, no ../shared. hf_gr runs from the working tree (PYTHONPATH=.), so nothing needs installing; if a
# wheel must travel anyway, put it in .whl/ (see /work/.library/device/README.md) and add ".whl" to carry.
#
# Once, here (never commit the data; outputs/ is ignored):
#   python scripts/gpu_check.py --prepare-data outputs/gpu_data    # 20,000 train + 5,000 test images, 46 MB
#   python scripts/gpu_check.py --dry-run --out /tmp/gpu_check     # the same code on CPU, about a minute
#
# Through the device tool, `run` with:
#   command:   bash scripts/gpu_check.sh
#   carry:     ["outputs/gpu_data"]
#   timeout_s: 500
# What comes back from $OUT (4 files): gpu_check.json (rewritten after every section, so a run cut short keeps
# what finished), gpu_check.log, gpu_check.stdout (everything printed, tracebacks included), env.txt.
#
# Time (a session has 15 min = 900 s of device time; the start, idle waits and transfers count):
#   machine start                                   60-120 s
#   this command: the script plans 440 s (GPU_CHECK_BUDGET_S), `timeout` stops it at 480 s, imports ~15 s:
#     correctness ~60 s, throughput <= 30% of what is left (~110 s), reproduction <= 240 s, compile the rest
#   transfers (46 MB up, < 1 MB back)                < 30 s
#   first call, worst case                          ~630 s   -> at least 270 s left
#   a rerun, at once on the still-warm machine (it is given back 30 s after a call), of what failed only:
#     GPU_CHECK_BUDGET_S=180 GPU_CHECK_SECTIONS=correctness,throughput bash scripts/gpu_check.sh   (timeout_s 230)
#   then call give_back. No rerun: call give_back right after the first call.
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

timeout --kill-after=10 $((${budget%.*} + 40)) python3 scripts/gpu_check.py --out "$out" --budget-s "$budget" \
    --sections "$sections" --data outputs/gpu_data/cifar10_subset.npz 2>&1 | tee "$out/gpu_check.stdout"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check.sh: stopped by timeout; $out/gpu_check.json holds the sections that finished"
exit "$rc"
