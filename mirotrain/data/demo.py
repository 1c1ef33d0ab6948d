"""A small synthetic but realistic data set for the embedded default and the tests (no network).

``sft.jsonl``: agent traces in the ``traces`` format -- system prompt, a research question, assistant turns
that think (``reasoning_content`` or inline ``<think>``), call tools (structured ``tool_calls`` answered by
``tool`` turns, or MiroVerse-style calls in the text answered by user turns carrying the tool output), long
tool outputs, and a final answer; lengths vary from a few dozen to a few thousand tokens.

``preference.jsonl``: arithmetic prompts with a chosen and a rejected answer. Chosen answers always follow one
pattern ("Sure. a + b = c.") and rejected ones break it ("Whatever, maybe <wrong>?"), so even a tiny randomly
initialised model separates them after a few DPO steps (the DPO test wants reward accuracy > 0.9).

Everything is drawn from ``random.Random(seed)``: same seed, same bytes.
"""

from __future__ import annotations

import json
import random
from typing import Any

import fsspec

_WORDS = (
    "model data training search result source paper method value table report evidence claim study query page "
    "system agent answer question context token network layer record market price city river year history "
    "science energy policy analysis summary detail figure section update version release library function"
).split()
_TOOLS = [
    {"type": "function", "function": {"name": "web_search", "description": "Search the web.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "fetch_page", "description": "Fetch a URL as text.",
                                      "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}},
]
_SYSTEM = "You are a research agent. Think step by step, use tools when needed, and cite sources."


def _sentence(rng: random.Random, n: int | None = None) -> str:
    n = n or rng.randint(5, 16)
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _tool_output(rng: random.Random, long: bool) -> str:
    n = rng.randint(40, 160) if long else rng.randint(2, 8)
    lines = [f"[{i + 1}] https://example.org/{rng.choice(_WORDS)}/{rng.randint(1, 999)} - {_sentence(rng)}" for i in range(n // 4 + 1)]
    return "\n".join(lines) + "\n" + _paragraph(rng, n)


def _trace(rng: random.Random, i: int) -> dict[str, Any]:
    structured = rng.random() < 0.5
    msgs: list[dict[str, Any]] = []
    if rng.random() < 0.8:
        msgs.append({"role": "system", "content": _SYSTEM})
    msgs.append({"role": "user", "content": f"Question {i}: " + _sentence(rng).rstrip(".") + "?"})
    steps = rng.choice([0, 1, 1, 2, 3, 4, 6])
    for s in range(steps):
        query = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5)))
        think = _paragraph(rng, rng.randint(1, 4))
        long = rng.random() < 0.3
        if structured:
            turn: dict[str, Any] = {"role": "assistant", "content": _sentence(rng) if rng.random() < 0.5 else "",
                                    "tool_calls": [{"type": "function", "function": {"name": rng.choice(["web_search", "fetch_page"]),
                                                                                    "arguments": {"query": query}}}]}
            if rng.random() < 0.7:
                turn["reasoning_content"] = think
            msgs.append(turn)
            msgs.append({"role": "tool", "content": _tool_output(rng, long)})
        else:
            call = ("<use_mcp_tool>\n<server_name>search</server_name>\n<tool_name>web_search</tool_name>\n"
                    f"<arguments>\n{json.dumps({'query': query})}\n</arguments>\n</use_mcp_tool>")
            msgs.append({"role": "assistant", "content": f"<think>\n{think}\n</think>\n\n{call}"})
            msgs.append({"role": "user", "content": _tool_output(rng, long)})
    final = _paragraph(rng, rng.randint(1, 6))
    if rng.random() < 0.5:
        final = f"<think>\n{_paragraph(rng, rng.randint(1, 3))}\n</think>\n\n{final}"
    msgs.append({"role": "assistant", "content": final})
    sample: dict[str, Any] = {"messages": msgs}
    if structured and steps:
        sample["tools"] = _TOOLS
    return sample


def _preference(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
    if rng.random() < 0.3:
        prompt.insert(0, {"role": "system", "content": "Answer briefly."})
    return {"prompt": prompt,
            "chosen": [{"role": "assistant", "content": f"Sure. {a} + {b} = {a + b}."}],
            "rejected": [{"role": "assistant", "content": f"Whatever, maybe {wrong}?"}]}


def demo_traces(num_samples: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_trace(rng, i) for i in range(num_samples)]


def demo_preferences(num_samples: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    return [_preference(rng) for _ in range(num_samples)]


def _write_jsonl(url: str, rows: list[dict]) -> None:
    with fsspec.open(url, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_demo(out_dir: str, num_samples: int = 200, seed: int = 0, num_pairs: int | None = None) -> dict[str, str]:
    """Write ``sft.jsonl`` and ``preference.jsonl`` under ``out_dir`` (any fsspec URL); returns their URLs."""
    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    base = out_dir.rstrip("/")
    files = {"sft": f"{base}/sft.jsonl", "preference": f"{base}/preference.jsonl"}
    _write_jsonl(files["sft"], demo_traces(num_samples, seed))
    _write_jsonl(files["preference"], demo_preferences(num_pairs if num_pairs is not None else num_samples, seed))
    return files


__all__ = ["demo_preferences", "demo_traces", "write_demo"]
