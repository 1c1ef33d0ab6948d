#!/usr/bin/env bash
# One-GPU session: GPU tests, then P2 (Qwen3-1.7B, one 16K sequence) ours vs HF+Liger. Logs under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout ${TESTS_S:-300} python3 -m pytest -p no:cacheprovider tests/gpu -m gpu -o addopts="" -q -s -x --timeout=280 "$@" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|\[|PASS|FAIL|Error" | tail -40
timeout ${BENCH_S:-280} python3 benchmarks/sft.py --size 1.7B --seq 16384 --nproc 1 --json "$OUT/sft_1.7b.json" 2>&1 | tee "$OUT/sft_1.7b.log" | tail -25
