"""`mirotrain download SRC --output-dir DIR [--hf-token T] [--revision R]`: fetch and verify model weights.

SRC is a Hugging Face Hub repo id (``Qwen/Qwen3-32B``), any fsspec URL (``s3://bucket/qwen3``,
``file:///data/qwen3``) or a local path. Re-running the same command resumes: complete files are skipped.
The token may also come from ``HF_TOKEN``; it is never printed. Exit code 0 = downloaded and verified,
1 = download or verification failed, 2 = bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from mirotrain.commands.errors import add_debug_flag, reports_user_errors
from mirotrain.hub import DownloadError, download


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirotrain download", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="Hub repo id (org/name or hf://org/name), fsspec URL, or local path")
    p.add_argument("--output-dir", required=True, help="destination directory (created; re-runs resume here)")
    p.add_argument("--hf-token", default=None, help="Hub token (default: $HF_TOKEN); never logged")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="only files matching this glob (repeatable), e.g. '*.safetensors'")
    p.add_argument("--no-verify", action="store_true", help="skip size / safetensors header / index checks")
    return add_debug_flag(p)


@reports_user_errors("mirotrain download")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        download(args.source, args.output_dir, token=args.hf_token, revision=args.revision,
                 include=args.include, verify=not args.no_verify)
    except DownloadError as exc:
        print(f"mirotrain download: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
