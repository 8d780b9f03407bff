#!/usr/bin/env bash
# The GPU check of the fast path (about 6 minutes on one H100/H200). It stops at the first failed check.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT (default gpu_check_out): probe.json, throughput.json/.txt, the run
#   WHEELS=DIR bash benchmarks/gpu_check.sh   # first install this project's requirements from wheels in DIR
#                                             # (a node without a package registry), keeping the installed torch
#
# Checks, in order (benchmarks/gpu_check.py): versions; CUDA and varlen_attn (forward and backward, bf16); unpadded vs
# stock BERT-base on CUDA in bf16 (cosine >= 0.999, loss and gradient error bounded, varlen used, no fallback);
# host-device syncs per training step (torch.cuda.set_sync_debug_mode); benchmarks/train_throughput.py --preset
# bert-base (plain, plain pre-tokenized, ours; MNRL and GradCache; encoding); a 30-step --stage sample run with
# logged MFU. Ends with:
#   gpu_check: speedup_train=X speedup_cached=Y speedup_encode=Z mfu=M syncs_per_step=S
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check_out}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if [ -n "${WHEELS:-}" ]; then
    python -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
    python -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a GPU node" >&2
    exit 2
fi
mkdir -p "$out"
python benchmarks/gpu_check.py probe --out "$out"
python benchmarks/train_throughput.py --preset bert-base --json "$out/throughput.json" | tee "$out/throughput.txt"
python model_exploration/st_trainer_ddp_hf.py --stage sample --model_name "$out/model" --output_base "$out/sample_run" \
    --max_steps 30 --logging_steps 10 --eval_and_save_steps 30 --batch_size 64 --gradient_accumulation_steps 1 \
    --max_datapoints_per_src_for_eval 0 --eval_benchmarks --wb_mode disabled
python benchmarks/gpu_check.py summary --out "$out"
