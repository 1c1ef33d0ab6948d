"""Helpers shared by tests/data (imported as a plain module: pytest puts this directory on sys.path)."""

import json
import random

WORDS = "alpha beta gamma delta search result page model answer tool value city river data".split()


def short_conversation(rng: random.Random, i: int) -> dict:
    """A short synthetic conversation (1-3 exchanges, sometimes system / tool calls / think)."""
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": "Be brief."})
    for t in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": f"q{i}.{t} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))})
        if rng.random() < 0.3:
            msgs.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "search", "arguments": {"q": rng.choice(WORDS)}}}]})
            msgs.append({"role": "tool", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))})
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        if rng.random() < 0.3:
            answer = f"<think>\n{rng.choice(WORDS)} {i}\n</think>\n\n{answer}"
        msgs.append({"role": "assistant", "content": answer})
    return {"messages": msgs}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def base_cfg(tmp_path, data_files, **dataset):
    if dataset.get("packed") or dataset.get("streaming_pack"):
        dataset.setdefault("packed_seq_len", 1024)
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "seed": 7,
        "batch_size": 1,
        "shuffle": True,
        "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "path": None, "max_seq_len": 1024},
        "dataset": {"_component_": "mirotrain.datasets.odr_chat_dataset", "source": "json", "data_files": data_files,
                    "conversation_column": "messages", "conversation_style": "traces", "num_workers": 0, **dataset},
    }
    return cfg


IM_START, IM_END, ASSISTANT, NL = 151644, 151645, 77091, 198


def reference_mask(ids):
    """Independent trained-token mask: from each `<|im_start|>assistant\\n` to the next `<|im_end|>` inclusive."""
    mask = [False] * len(ids)
    i = 0
    while i < len(ids) - 2:
        if ids[i] == IM_START and ids[i + 1] == ASSISTANT and ids[i + 2] == NL:
            j = i + 3
            while ids[j] != IM_END:
                mask[j] = True
                j += 1
            mask[j] = True
            i = j
        i += 1
    return mask


def split_docs(input_ids, seq_lens):
    out, start = [], 0
    for n in seq_lens:
        out.append(input_ids[start:start + n])
        start += n
    return out
