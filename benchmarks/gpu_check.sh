#!/usr/bin/env bash
# The one prepared device check (issue 13): everything a short GPU lease should measure, in one go,
# each step under its own time limit and all of them under one deadline (9.5 minutes), so that the
# whole stays under 10 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # writes gpu_check/summary.md (and each step's full log)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # tiny sizes on the CPU: checks the script itself
#
# Steps, most valuable first: the GPU-marked tests; clip_med's trainer against open_clip_train.main on
# the same shards (ViT-B-16, 224 px, bf16, batch 256, 12 loader workers), samples/s and ratio, peak GPU
# memory; clip_med with the per-step sync put back (trainer.sync_every_step=true) against the default,
# MFU from the model's FLOPs, one checkpoint's snapshot and background write (benchmarks/gpu_extras.py);
# the loader alone against raw decode + transform + tokenize; embedding extraction.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.md"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))

if [[ -n "${GPU_CHECK_DRY_RUN:-}" ]]; then  # the same steps at toy sizes, on the CPU
    DEVICE=cpu MODEL=medclip-tiny IMAGE=32 SOURCE_IMAGE=48 BATCH=8 PRECISION=fp32 WORKERS=1 SAMPLES=600
    SHARD=100 STEPS=8 WARMUP=3 EXTRA_STEPS=6 EXTRA_WARMUP=2 LOADER_BATCHES=4 IMAGES=64 TESTS="tests/test_gpu_readiness.py"
else
    DEVICE=cuda MODEL=ViT-B-16 IMAGE=224 SOURCE_IMAGE=256 BATCH=256 PRECISION=bf16 WORKERS=12 SAMPLES=28000
    SHARD=1000 STEPS=60 WARMUP=15 EXTRA_STEPS=40 EXTRA_WARMUP=10 LOADER_BATCHES=20 IMAGES=4096 TESTS="-m gpu tests"
fi
DATA=(--work "$OUT/train_bench" --device "$DEVICE" --model "$MODEL" --image-size "$IMAGE"
      --source-image-size "$SOURCE_IMAGE" --batch-size "$BATCH" --workers "$WORKERS" --samples "$SAMPLES"
      --shard-size "$SHARD")

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/    /'
    "$PY" -c "import torch; print('    torch', torch.__version__, 'cuda', torch.version.cuda, \
'capability', torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)"
    echo
} > "$SUMMARY"

step() {  # step <name> <seconds> <command...>: run with a time limit, keep the log, note the outcome
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        echo "## $name (skipped: the check's deadline is reached)" >> "$SUMMARY"
        echo >> "$SUMMARY"
        return
    fi
    ((limit > left)) && limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "## $name (exit $rc, $((SECONDS - start)) s of at most $limit; full log $OUT/$name.log)" >> "$SUMMARY"
    echo >> "$SUMMARY"
    # the tables each benchmark prints, or the last lines of a test run
    grep -E '^\|' "$OUT/$name.log" >> "$SUMMARY" || tail -n 15 "$OUT/$name.log" >> "$SUMMARY"
    grep -E '^(paired ratios|machine|setup):' "$OUT/$name.log" >> "$SUMMARY"
    echo >> "$SUMMARY"
}

# shellcheck disable=SC2086  # TESTS holds several words on purpose
step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider $TESTS
step trainers 240 "$PY" benchmarks/train_bench.py "${DATA[@]}" --precision "$PRECISION" --steps "$STEPS" \
    --warmup-steps "$WARMUP" --loader-batches "$LOADER_BATCHES" --skip loader
step sync_mfu_checkpoint 150 "$PY" benchmarks/gpu_extras.py "${DATA[@]}" --precision "$PRECISION" \
    --steps "$EXTRA_STEPS" --warmup-steps "$EXTRA_WARMUP"
step loader 60 "$PY" benchmarks/train_bench.py "${DATA[@]}" --loader-batches "$LOADER_BATCHES" --skip trainers
step embed 45 "$PY" benchmarks/embed_bench.py --model "$MODEL" --device "$DEVICE" --images "$IMAGES" \
    --batch-size "$BATCH"

cat "$SUMMARY"
