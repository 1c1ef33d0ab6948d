#!/usr/bin/env bash
# Four-GPU session (one 10-minute call): P1 SFT 8B ours vs HF-FSDP2+Liger, async vs sync checkpoint, DPO vs SFT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
F='UserWarning|This call|File "|if _|_dynamo|^$|warn'
cleanup() { pkill -9 -f "tor[c]hrun|--wor[k]er" >/dev/null 2>&1; sleep 3; }  # patterns that do not match this script
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
echo "== P1: Qwen3-8B, 16K/GPU, 4 GPUs"
timeout ${SFT_S:-270} python3 benchmarks/sft.py --size 8B --seq 16384 --nproc 4 --ac selective --ac-option attention \
  --chunk 2048 --steps 4 --warmup 2 --json "$OUT/sft_8b.json" 2>&1 | tee "$OUT/sft_8b.log" | grep -Ev "$F" | tail -4
cleanup
echo "== checkpoint: async vs sync, 8B"
timeout ${CKPT_S:-130} python3 benchmarks/checkpoint.py --saves 2 --json "$OUT/ckpt.json" 2>&1 | tee "$OUT/ckpt.log" | grep -Ev "$F" | tail -8
cleanup
echo "== DPO vs SFT, 8B"
timeout ${DPO_S:-170} python3 benchmarks/dpo.py --steps 3 --warmup 2 --json "$OUT/dpo.json" 2>&1 | tee "$OUT/dpo.log" | grep -Ev "$F" | tail -8
