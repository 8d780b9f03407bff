#!/usr/bin/env bash
# The GPU check of the fast path (about 6 minutes on one H100/H200 once the machine is up).
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT (default gpu_check_out): probe.json, throughput.json, *.log, the run
#   WHEELS=DIR bash benchmarks/gpu_check.sh   # first install this project's requirements from wheels in DIR into
#                                             # /tmp/gpu_check_site (a node without a package registry), keeping the
#                                             # image's torch
#   PYTHON=/path/to/python3 STEP_SECONDS=150  # the interpreter that holds the CUDA torch; each step's time limit
#
# Checks, in order (benchmarks/gpu_check.py): versions; CUDA and varlen_attn (forward and backward, bf16); unpadded vs
# stock BERT-base on CUDA in bf16 (cosine >= 0.999, loss and gradient error bounded, varlen used, no fallback);
# host-device syncs per training step (torch.cuda.set_sync_debug_mode); benchmarks/train_throughput.py --preset
# bert-base (plain, plain pre-tokenized, ours; MNRL and GradCache; encoding); a 30-step --stage sample run with
# logged MFU. Every step runs under its own time limit and logs to OUT/<step>.log as it goes, so a step that hangs
# costs one limit, not the lease, and what ran is on disk. Ends with:
#   gpu_check: speedup_train=X speedup_cached=Y speedup_encode=Z mfu=M syncs_per_step=S
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-gpu_check_out}
step_seconds=${STEP_SECONDS:-150}
# `python` is not always the interpreter with the CUDA torch (on some images only python3 is, inside a venv: a
# symlink to it loses the venv), so one interpreter is named and used throughout.
py=${PYTHON:-$(command -v python3 || command -v python)}
[ -n "$py" ] || { echo "gpu_check: no python3 or python on PATH; set PYTHON=" >&2; exit 2; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu_check_site "$WHEELS"/*.whl \
        || { echo "gpu_check: installing the wheels in $WHEELS failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/gpu_check_site:${PYTHONPATH:-}
fi
"$py" -c "import model_exploration" 2>/dev/null || export PYTHONPATH=$PWD:${PYTHONPATH:-}
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $py cannot import torch; set PYTHON= to the interpreter that holds the CUDA torch" >&2
    exit 2
fi
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a GPU node" >&2
    exit 2
fi
mkdir -p "$out" || exit 1

step() {  # step NAME COMMAND...: run under the time limit, log to OUT/NAME.log, stop the check on failure
    local name=$1
    shift
    echo "gpu_check: step $name (limit ${step_seconds}s)"
    # SIGKILL 20 s after SIGTERM: the trainer takes SIGTERM as a request to checkpoint at the next step
    timeout -k 20 "$step_seconds" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "gpu_check: step $name failed (exit $rc; 124 = over ${step_seconds}s); log: $out/$name.log" >&2
        exit 1
    fi
}
step probe "$py" benchmarks/gpu_check.py probe --out "$out"
step throughput "$py" benchmarks/train_throughput.py --preset bert-base --json "$out/throughput.json"
step sample "$py" model_exploration/st_trainer_ddp_hf.py --stage sample --model_name "$out/model" \
    --output_base "$out/sample_run" --max_steps 30 --logging_steps 10 --eval_and_save_steps 30 --batch_size 64 \
    --gradient_accumulation_steps 1 --max_datapoints_per_src_for_eval 0 --eval_benchmarks --wb_mode disabled
step summary "$py" benchmarks/gpu_check.py summary --out "$out"
