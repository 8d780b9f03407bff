#!/usr/bin/env bash
# The GPU check of the fast path, written for a short batch job on an air-gapped node: one command, a hard time
# limit, no package registry, and only small files of one output folder coming back.
#
#   bash benchmarks/gpu_check.sh "$OUT"                          # on the GPU node (wheels from .whl/ if present)
#   GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh OUT       # every step on CPU at tiny shapes (the test suite
#                                                                # runs this; its figures are not GPU figures)
# Settings (environment): PYTHON (default python3: on the lent image only python3, inside a venv, holds the CUDA
# torch), WHEELS (default .whl when it exists, "none" for none: wheels installed without their dependencies into
# SCRATCH-site, with pip where the image has it, else unpacked (they are pure Python), keeping the image's torch),
# DEADLINE_SECONDS (default 540, counted from the first line; 3x that and 3x each step's limit in the rehearsal),
# SCRATCH (default /tmp/gpu_check_scratch: models, runs and checkpoints, never in OUT). Nothing else is set for one
# path and not the other: the plain trainer tokenizes with tokenizers' own parallelism, as a user runs it.
#
# OUT receives only small files, each written as its result exists: gpu_check.jsonl (the versions, each check, each
# measured row and ratio, each step's exit status, the closing line: one JSON object per line) and one log per step.
# Steps, value checks first, then timings most valuable first, each under its own limit and never past the
# deadline (a step that fails or is cut off is recorded and the next one runs):
#   probe    attention kernels' values (varlen_attn and bucketed SDPA against a dense fp32 reference), stock ==
#            unpadded per architecture on a model whose attention matters (BERT, INDUS-SDE's RoBERTa, ModernBERT,
#            MPNet), host-device syncs per step per architecture and for GradCache (gpu_check.py probe)
#   mnrl     plain vs ours MNRL training, BERT-base shape, batch 128, max_len 512, real-text and synthetic length
#            mixes, interleaved step by step (train_throughput.py)
#   encode   SentenceTransformer.encode vs encode_fast, same shape and mixes, with the encoders' agreement
#   cached   GradCache: plain vs ours, mini-batch 64
#   indus    plain vs ours MNRL training and encoding at INDUS-SDE's shape (RoBERTa-base, 1,026 positions, 1,024)
#            on the long-document mix
#   sample   a 30-step --stage sample run of the entry script on that RoBERTa, with its logged MFU
# The last line is the closing line: gpu_check <GPU> <date>: speedup_train_real=... ...; failed: ... (a speed-up
# whose equality check failed reads "invalid(...)").
# Exit status: 0 every check passed, 3 some failed or were cut off (named in the closing line), 2 cannot run here.
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
out=${1:-}
[ -n "$out" ] || { echo "gpu_check: name the output folder: bash benchmarks/gpu_check.sh \"\$OUT\"" >&2; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
rehearsal=${GPU_CHECK_REHEARSAL:-0}
# a CPU is slower than the GPU even at tiny shapes (and CI shares it with the test suite): wider limits, same rules
slack=$([ "$rehearsal" = 1 ] && echo 3 || echo 1)
deadline=$((started + ${DEADLINE_SECONDS:-$((540 * slack))}))
scratch=${SCRATCH:-/tmp/gpu_check_scratch}
site=$scratch-site
py=${PYTHON:-$(command -v python3 || command -v python)}
[ -n "$py" ] || { echo "gpu_check: no python3 or python on PATH; set PYTHON=" >&2; exit 2; }
wheels=${WHEELS:-}
[ -z "$wheels" ] && [ -d .whl ] && wheels=.whl
[ "$wheels" = none ] && wheels=
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export GPU_CHECK_REHEARSAL=$rehearsal

if [ -n "$wheels" ]; then  # quietly: the first line printed is the versions line
    rm -rf "$site"
    if ! PYTHONPATH="$PWD" "$py" benchmarks/gpu_check.py install --wheels "$wheels" --site "$site" \
        > "$scratch.install.log" 2>&1; then
        echo "gpu_check: installing the wheels in $wheels failed: $(tail -n 1 "$scratch.install.log")" >&2
    fi
    export PYTHONPATH="$site:$PWD"  # exactly these: an inherited PYTHONPATH could shadow either
else
    export PYTHONPATH="$PWD"
fi
"$py" benchmarks/gpu_check.py versions --out "$out" || { echo "gpu_check: $py cannot run the check (no torch?)" >&2; exit 2; }
# every later step needs both: stop now, in one line, rather than let each die on an ImportError
if ! "$py" -c "import datasets, sentence_transformers as st, sys; sys.exit(tuple(map(int, st.__version__.split('.')[:2])) < (6, 2))" \
    > "$scratch.import.log" 2>&1; then
    echo "gpu_check: datasets and sentence-transformers >= 6.2 do not import with $py ($(tail -n 1 "$scratch.import.log" | cut -c 1-200)); bring them as wheels (benchmarks/gpu_wheels.txt)" >&2
    exit 2
fi
if [ "$rehearsal" != 1 ] && ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch; run it on a GPU node, or rehearse on CPU with GPU_CHECK_REHEARSAL=1" >&2
    exit 2
fi
rm -rf "$scratch" && mkdir -p "$scratch" || exit 2

record_step() {  # NAME RC SECONDS [skipped]: one JSON line per step
    printf '{"kind": "step", "rehearsal": %s, "name": "%s", "rc": %d, "seconds": %d, "skipped": %s}\n' \
        "$([ "$rehearsal" = 1 ] && echo true || echo false)" "$1" "$2" "$3" "${4:-false}" >> "$out/gpu_check.jsonl"
}

reserve=25  # kept for the summary
step() {  # NAME CAP COMMAND...: at most CAP seconds and never past the deadline; the log in OUT/NAME.log
    local name=$1 cap=$2
    shift 2
    local left=$((deadline - $(date +%s) - reserve))
    if [ "$left" -lt 30 ]; then
        echo "gpu_check: step $name skipped: ${left}s left before the deadline"
        record_step "$name" 0 0 true
        return
    fi
    cap=$((cap * slack))
    local limit=$((cap < left ? cap : left)) begun
    begun=$(date +%s)
    echo "gpu_check: step $name (limit ${limit}s)"
    # SIGKILL 10 s after SIGTERM: the trainer takes SIGTERM as a request to checkpoint at the next step
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$? took=$(($(date +%s) - begun))
    record_step "$name" "$rc" "$took"
    if [ "$rc" -eq 0 ]; then
        echo "gpu_check: step $name ok (${took}s)"
    else
        echo "gpu_check: step $name FAILED (exit $rc; 124 = past its ${limit}s) after ${took}s; last lines of $name.log:"
        tr '\r' '\n' < "$out/$name.log" | grep -v '^ *$' | tail -n 4 | cut -c 1-300  # progress bars end in \r
    fi
}

throughput=(benchmarks/train_throughput.py --rows_jsonl "$out/gpu_check.jsonl")
sample=(--max_steps 30 --logging_steps 10 --eval_and_save_steps 30 --batch_size 64)
if [ "$rehearsal" = 1 ]; then  # the same steps at tiny shapes, seconds each on one CPU core
    throughput+=(--hidden 64 --layers 2 --heads 2 --intermediate 128 --steps 1 --warmup 1 --batch_size 8
        --max_len 64 --mini_batch_size 4 --encode_passages 16 --encode_batch_size 8 --encode_repeats 1)
    sample=(--max_steps 3 --logging_steps 1 --eval_and_save_steps 3 --batch_size 8 --nrows 32 --model_max_len 64)
fi
step probe 150 "$py" benchmarks/gpu_check.py probe --out "$out" --scratch "$scratch"
step mnrl 150 "$py" "${throughput[@]}" --preset bert-base --paths mnrl
step encode 90 "$py" "${throughput[@]}" --preset bert-base --paths encode
step cached 120 "$py" "${throughput[@]}" --preset bert-base --paths cached --mix real
step indus 150 "$py" "${throughput[@]}" --preset indus-sde --paths mnrl encode
step sample 120 "$py" benchmarks/gpu_check.py sample --scratch "$scratch" -- "${sample[@]}"
"$py" benchmarks/gpu_check.py summary --out "$out" --scratch "$scratch" 2> "$scratch/summary.log"
rc=$?  # 0: every check passed, 3: some failed (the closing line names them), else the summary itself broke
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
    echo "gpu_check: the summary failed ($(tail -n 1 "$scratch/summary.log")); the results are in gpu_check.jsonl"
fi
exit "$rc"
