"""`mirotrain pack --config X [key=value ...] [--section dataset] [--workers N] [--force]`.

Tokenises the config's dataset with a pool of worker processes, packs it (best-fit decreasing, see
``mirotrain.data.packing``) and writes Arrow shards + ``manifest.json`` under ``dataset.output_dir`` (any
fsspec URL) in a subdirectory keyed by a hash of inputs, tokenizer and options; re-running with the same
inputs is a no-op. Prints the shard directory on stdout (last line) and a summary on stderr.
The config is checked first, as `mirotrain validate` checks it (only the tokenizer and the packed section).
Exit codes: 0 packed (or cache hit), 2 bad config, data or arguments (one line naming the key or file:line).
"""

from __future__ import annotations

import argparse
import json
import sys

from mirotrain.commands.errors import add_debug_flag, reports_user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirotrain pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config with tokenizer and dataset sections")
    p.add_argument("--section", default="dataset", help="config section to pack (default: dataset)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: dataset.num_workers or all cores)")
    p.add_argument("--force", action="store_true", help="re-pack even if a complete shard directory exists")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return add_debug_flag(p)


@reports_user_errors("mirotrain pack")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from mirotrain.config.tree import read_config
    from mirotrain.data.pack_shards import build_dataset, output_root, pack, summary_line

    cfg = read_config(args.config, args.overrides, scope=("tokenizer", args.section))
    ds = build_dataset(cfg, args.section)
    workers = args.workers if args.workers is not None else ds.options.num_workers
    out_dir, manifest = pack(ds, output_root(cfg, args.section), num_workers=workers,
                             progress=sys.stderr.isatty(), force=args.force)
    state = "cache hit (already packed)" if manifest.get("cache_hit") else f"packed in {manifest.get('seconds')} s"
    print(f"mirotrain pack: {state}: {summary_line(manifest)}", file=sys.stderr, flush=True)
    for example in manifest.get("skip_examples", []):
        print(f"  skipped: {example}", file=sys.stderr)
    if args.json:
        print(json.dumps({**manifest, "shard_dir": out_dir}, indent=2, default=str))
    print(out_dir, flush=True)
    return 0
