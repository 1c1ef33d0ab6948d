"""Pack throughput: `mirotrain pack` vs a plain `datasets.map` tokenize + Python greedy pack (CPU).

    python benchmarks/pack.py [--num-samples 2000] [--workers 2] [--packed-seq-len 16384] [--repeats 2]

Both sides read the same demo agent traces (``mirotrain.data.demo``), render them with the real Qwen3 chat
template and tokenise them; tokenizer loading is excluded from both timings. The baseline
(``datasets.load_dataset("text")`` -> ``.map(apply_chat_template(tokenize=True), num_proc=workers)`` -> greedy
"append until full" packing in Python) computes no loss mask and writes nothing; ``mirotrain pack`` also
masks, shifts labels, best-fit packs and writes Arrow shards + manifest. Reported: tokens/s (input tokens /
wall seconds), rows and pad fraction. Prints one JSON line per side and a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_mirotrain(data_file: str, out_root: str, tok, workers: int, L: int) -> dict:
    from mirotrain.data.datasets import odr_chat_dataset
    from mirotrain.data.pack_shards import pack

    ds = odr_chat_dataset(tok, source="json", data_files=data_file, packed=True, packed_seq_len=L)
    t0 = time.perf_counter()
    _, m = pack(ds, out_root, num_workers=workers, force=True)
    dt = time.perf_counter() - t0
    return {"side": "mirotrain pack", "seconds": round(dt, 2), "tokens": m["tokens"], "tokens_per_s": round(m["tokens"] / dt),
            "rows": m["rows"], "pad_fraction": round(m["pad_fraction"], 4)}


def run_baseline(data_file: str, hf_tok, workers: int, L: int, cache_dir: str) -> dict:
    import datasets

    from mirotrain.data.packing import greedy_packs

    datasets.disable_progress_bars()

    def tokenize(batch):
        out = []
        for line in batch["text"]:
            rec = json.loads(line)
            ids = hf_tok.apply_chat_template(rec["messages"], tools=rec.get("tools"), tokenize=True)["input_ids"]
            out.append(list(ids)[:L])
        return {"input_ids": out}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("text", data_files=data_file, split="train", cache_dir=cache_dir)
    ds = ds.map(tokenize, batched=True, batch_size=64, num_proc=workers if workers > 1 else None,
                remove_columns=["text"], load_from_cache_file=False)
    ids = ds["input_ids"]
    lengths = [len(x) for x in ids]
    rows = []
    for pack_ in greedy_packs(lengths, L):
        row: list[int] = []
        for i in pack_:
            row.extend(ids[i])
        rows.append(row)
    dt = time.perf_counter() - t0
    tokens = sum(lengths)
    return {"side": "datasets.map + greedy", "seconds": round(dt, 2), "tokens": tokens, "tokens_per_s": round(tokens / dt),
            "rows": len(rows), "pad_fraction": round(1 - tokens / (len(rows) * L), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--packed-seq-len", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=2, help="best of N runs per side")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from mirotrain.data.demo import write_demo
    from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir, qwen3_tokenizer_auto

    tmp = tempfile.mkdtemp(prefix="mt-packbench-")
    try:
        files = write_demo(os.path.join(tmp, "data"), num_samples=args.num_samples, seed=0, num_pairs=1)
        tok = qwen3_tokenizer_auto(max_seq_len=args.packed_seq_len)
        hf_tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
        results = []
        for side in ("baseline", "mirotrain"):
            best = None
            for r in range(args.repeats):
                if side == "baseline":
                    res = run_baseline(files["sft"], hf_tok, args.workers, args.packed_seq_len, os.path.join(tmp, f"hfcache{r}"))
                else:
                    res = run_mirotrain(files["sft"], os.path.join(tmp, f"packed{r}"), tok, args.workers, args.packed_seq_len)
                if best is None or res["seconds"] < best["seconds"]:
                    best = res
            results.append(best)
            print(json.dumps(best), flush=True)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, load average {load:.1f}")
        print("| side | samples | tokens | seconds | tokens/s | rows | pad fraction |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['side']} | {args.num_samples} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | {r['rows']} | {r['pad_fraction']} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
