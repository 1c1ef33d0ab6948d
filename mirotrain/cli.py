"""`mirotrain <command> ...`: one entry point, each command in its own module.

Commands live in ``mirotrain/commands/<name>.py`` and expose ``main(argv: list[str]) -> int``. They are
imported lazily so that ``mirotrain --help`` and light commands never pay for heavy imports. How they report
user errors (one line, exit code 2, ``--debug`` for the traceback) is ``mirotrain/commands/errors.py``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "sft": "Supervised fine-tuning (run under torchrun or as one process).",
    "dpo": "Direct preference optimisation.",
    "pack": "Tokenize and pack a dataset into Arrow shards.",
    "convert": "Convert a step checkpoint (DCP) to HF safetensors.",
    "download": "Download model weights (HF Hub, fsspec URL or local path).",
    "validate": "Resolve and check a config; print the model size and memory estimate.",
    "data": "Data utilities (e.g. `mirotrain data demo --out DIR`).",
    "demo": "Run the embedded default end to end.",
}


def _usage() -> str:
    lines = ["usage: mirotrain <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "A bad config key, data file or input is reported as one line with exit code 2;",
              "add --debug to a command to see its traceback instead."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mirotrain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mirotrain.commands.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
