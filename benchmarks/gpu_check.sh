#!/usr/bin/env bash
# The one prepared device check (issue 13): everything a short GPU lease should measure, in one go,
# each step under its own time limit so that the whole stays under ~10 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # writes gpu_check/summary.md (and each step's full log)
#
# Steps: the GPU-marked tests; clip_med's trainer against open_clip_train.main on the same shards
# (ViT-B-16, 224 px, bf16, batch 256, 12 loader workers), samples/s and ratio, peak GPU memory; the
# loader alone against raw decode + transform + tokenize; embedding extraction. Not yet measured
# here (code still to come, see issue 13): the per-step host sync removed, background checkpoint
# writes, MFU from the model's FLOPs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.md"
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
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "## $name (exit $rc, $((SECONDS - start)) s; full log $OUT/$name.log)" >> "$SUMMARY"
    echo >> "$SUMMARY"
    # the tables each benchmark prints, or the last lines of a test run
    grep -E '^\|' "$OUT/$name.log" >> "$SUMMARY" || tail -n 15 "$OUT/$name.log" >> "$SUMMARY"
    grep -E '^(paired ratios|machine|setup):' "$OUT/$name.log" >> "$SUMMARY"
    echo >> "$SUMMARY"
}

step gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
step trainers 300 "$PY" benchmarks/train_bench.py --work "$OUT/train_bench" --device cuda --model ViT-B-16 \
    --image-size 224 --source-image-size 256 --batch-size 256 --precision bf16 --workers 12 --samples 28000 \
    --shard-size 1000 --steps 60 --warmup-steps 15 --loader-batches 40 --skip loader
step loader 90 "$PY" benchmarks/train_bench.py --work "$OUT/train_bench" --device cuda --model ViT-B-16 \
    --image-size 224 --source-image-size 256 --batch-size 256 --workers 12 --samples 28000 --shard-size 1000 \
    --loader-batches 20 --skip trainers
step embed 60 "$PY" benchmarks/embed_bench.py --model ViT-B-16 --device cuda --images 4096 --batch-size 256

cat "$SUMMARY"
