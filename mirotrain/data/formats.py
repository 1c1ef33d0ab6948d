"""Source formats -> the message contract (``{"role", "content", "reasoning_content"?, "tool_calls"?}``).

One validation for every format, so agent traces, OpenAI logs, ShareGPT dumps and Alpaca sets fail the same
way on the same mistakes (unknown role, empty conversation, assistant first, wrong types) with a message
that names the message index. Callers attach the file and line (:class:`mirotrain.data.errors.DataError`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from mirotrain.data.errors import SampleFormatError

ROLES = ("system", "user", "assistant", "tool")
CONVERSATION_STYLES = ("traces", "openai", "sharegpt")
_ROLE_ALIASES = {"developer": "system", "function": "tool", "ipython": "tool", "observation": "tool"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
    "tool": "tool",
}


def _text(value: Any, what: str, allow_none: bool = False) -> str | list | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) and p.get("type", "text") == "text" for p in value):
        return [{"type": "text", "text": p["text"]} for p in value]
    raise SampleFormatError(f"{what} must be a string or a list of {{'type': 'text', 'text': ...}} parts, got {type(value).__name__}")


def _tool_calls(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list):
        raise SampleFormatError(f"{what}.tool_calls must be a list, got {type(value).__name__}")
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise SampleFormatError(f"{what}.tool_calls[{j}] must have a function name (a string)")
        args = fn.get("arguments", {})
        if not isinstance(args, (str, dict)):
            raise SampleFormatError(f"{what}.tool_calls[{j}].arguments must be a JSON string or an object, got {type(args).__name__}")
        calls.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _has_text(content: Any) -> bool:
    if content is None:
        return False
    if isinstance(content, str):
        return bool(content.strip())
    return any(p["text"].strip() for p in content)


def validate_messages(messages: Any) -> list[dict]:
    """Check the conversation shape and return normalised messages.

    Rules: a non-empty list; roles in system/user/assistant/tool; system only first; the first non-system turn
    is a user turn; a tool result follows an assistant turn or another tool result; at least one assistant
    turn; assistant turns need content or tool calls.
    """
    if not isinstance(messages, list):
        raise SampleFormatError(f"the conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise SampleFormatError("empty conversation (no messages)")
    out: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise SampleFormatError(f"{where} must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str):
            raise SampleFormatError(f"{where} has no 'role' string")
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise SampleFormatError(f"{where} has unknown role {msg.get('role')!r} (expected one of {', '.join(ROLES)})")
        m: dict = {"role": role, "content": _text(msg.get("content"), f"{where}.content", allow_none=role == "assistant")}
        if role == "assistant":
            if msg.get("reasoning_content") is not None:
                m["reasoning_content"] = _text(msg["reasoning_content"], f"{where}.reasoning_content")
            if msg.get("tool_calls"):
                m["tool_calls"] = _tool_calls(msg["tool_calls"], where)
            if not _has_text(m["content"]) and not m.get("tool_calls") and not m.get("reasoning_content"):
                raise SampleFormatError(f"{where} is an empty assistant turn")
            if m["content"] is None:
                m["content"] = ""
        if role == "system" and i != 0:
            raise SampleFormatError(f"{where}: a system message may only come first")
        out.append(m)
    body = [m["role"] for m in out if m["role"] != "system"]
    if not body:
        raise SampleFormatError("the conversation has only a system message")
    first = next(i for i, m in enumerate(out) if m["role"] != "system")
    if out[first]["role"] == "assistant":
        raise SampleFormatError(f"assistant turn first (message {first}); a conversation starts with a user turn")
    if out[first]["role"] == "tool":
        raise SampleFormatError(f"tool result first (message {first}); a conversation starts with a user turn")
    for i in range(first + 1, len(out)):
        if out[i]["role"] == "tool" and out[i - 1]["role"] not in ("assistant", "tool"):
            raise SampleFormatError(f"message {i}: a tool result must follow an assistant turn or another tool result")
    if "assistant" not in body:
        raise SampleFormatError("no assistant turn (nothing to train on)")
    return out


def _apply_system(messages: list[dict], new_system_prompt: str | None) -> list[dict]:
    if new_system_prompt is None:
        return messages
    def is_system(m: Any) -> bool:
        return isinstance(m, dict) and _ROLE_ALIASES.get(m.get("role"), m.get("role")) == "system"

    return [{"role": "system", "content": new_system_prompt}] + [m for m in messages if not is_system(m)]


def _column(record: dict, column: str) -> Any:
    if not isinstance(record, dict):
        raise SampleFormatError(f"a sample must be a JSON object, got {type(record).__name__}")
    if column not in record:
        raise SampleFormatError(f"missing column {column!r} (columns: {', '.join(map(str, record)) or 'none'})")
    return record[column]


def _tools(record: dict) -> list | None:
    tools = record.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise SampleFormatError(f"'tools' is not valid JSON: {exc}") from None
    if not isinstance(tools, list):
        raise SampleFormatError(f"'tools' must be a list of function schemas, got {type(tools).__name__}")
    return tools


def traces_to_messages(record: dict, column: str = "messages", new_system_prompt: str | None = None) -> dict:
    """Agent traces (MiroVerse style): ``{"messages": [...]}``; tool results may come back as user turns."""
    msgs = _column(record, column)
    if isinstance(msgs, list):
        msgs = [dict(m) if isinstance(m, dict) else m for m in msgs]
    return {"messages": validate_messages(_apply_system(msgs, new_system_prompt) if isinstance(msgs, list) else msgs), "tools": _tools(record)}


def openai_to_messages(record: dict, column: str = "messages", new_system_prompt: str | None = None) -> dict:
    """OpenAI chat logs: roles incl. ``tool`` (and legacy ``function``), assistant ``tool_calls``."""
    return traces_to_messages(record, column, new_system_prompt)


def sharegpt_to_messages(record: dict, column: str = "conversations", new_system_prompt: str | None = None) -> dict:
    """ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}]}``.

    A ``function_call`` turn's value is the JSON call ``{"name", "arguments"}``; it joins the preceding gpt
    turn (if that has no call yet) as ``tool_calls``, since one assistant turn may speak and then call.
    """
    convo = _column(record, column)
    if not isinstance(convo, list):
        raise SampleFormatError(f"column {column!r} must be a list of turns, got {type(convo).__name__}")
    msgs: list[dict] = []
    if isinstance(record.get("system"), str) and record["system"]:
        msgs.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(convo):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleFormatError(f"turn {i} must have 'from' and 'value'")
        src = turn["from"]
        if src not in _SHAREGPT_ROLES:
            raise SampleFormatError(f"turn {i} has unknown role {src!r} (expected one of {', '.join(_SHAREGPT_ROLES)})")
        value = turn["value"]
        if not isinstance(value, str):
            raise SampleFormatError(f"turn {i}.value must be a string, got {type(value).__name__}")
        if src == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as exc:
                raise SampleFormatError(f"turn {i}: function_call value is not JSON: {exc}") from None
            calls = _tool_calls(call if isinstance(call, list) else [call], f"turn {i}")
            if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1].get("tool_calls"):
                msgs[-1]["tool_calls"] = calls
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        msgs.append({"role": _SHAREGPT_ROLES[src], "content": value})
    return {"messages": validate_messages(_apply_system(msgs, new_system_prompt)), "tools": _tools(record)}


def alpaca_to_messages(record: dict, new_system_prompt: str | None = None, column_map: dict | None = None) -> dict:
    """Alpaca: ``instruction`` (+ optional ``input``) -> user, ``output`` -> assistant."""
    cmap = {"instruction": "instruction", "input": "input", "output": "output", **(column_map or {})}
    instruction = _column(record, cmap["instruction"])
    output = _column(record, cmap["output"])
    extra = record.get(cmap["input"]) or ""
    for name, value in (("instruction", instruction), ("output", output), ("input", extra)):
        if not isinstance(value, str):
            raise SampleFormatError(f"'{cmap[name]}' must be a string, got {type(value).__name__}")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": validate_messages(_apply_system(msgs, new_system_prompt)), "tools": None}


def converter_for(style: str, column: str | None, new_system_prompt: str | None) -> Callable[[dict], dict]:
    """The record -> ``{"messages", "tools"}`` function for a ``conversation_style``."""
    if style == "traces":
        return lambda r: traces_to_messages(r, column or "messages", new_system_prompt)
    if style == "openai":
        return lambda r: openai_to_messages(r, column or "messages", new_system_prompt)
    if style == "sharegpt":
        return lambda r: sharegpt_to_messages(r, column or "conversations", new_system_prompt)
    if style == "alpaca":
        return lambda r: alpaca_to_messages(r, new_system_prompt)
    raise ValueError(f"conversation_style must be one of {', '.join(CONVERSATION_STYLES)} (or use alpaca_dataset), got {style!r}")


# -- preference pairs -------------------------------------------------------------------------------

def _as_messages(value: Any, what: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise SampleFormatError(f"{what} must be a string, a message or a list of messages, got {type(value).__name__}")


def preference_to_messages(
    record: dict,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    new_system_prompt: str | None = None,
) -> dict:
    """Preference pair -> ``{"prompt": msgs, "chosen": msgs, "rejected": msgs, "tools"}``.

    Accepts ``prompt`` + ``chosen``/``rejected`` as strings or message lists, or (no prompt column) full
    conversations whose shared prefix is the prompt and whose trailing assistant turns are the responses.
    """
    if not isinstance(record, dict):
        raise SampleFormatError(f"a sample must be a JSON object, got {type(record).__name__}")
    chosen = _as_messages(_column(record, chosen_column), f"'{chosen_column}'", "assistant")
    rejected = _as_messages(_column(record, rejected_column), f"'{rejected_column}'", "assistant")
    if prompt_column in record and record[prompt_column] is not None:
        prompt = _as_messages(record[prompt_column], f"'{prompt_column}'", "user")
    else:
        def split(conv: list) -> tuple[list, list]:
            k = len(conv)
            while k > 0 and isinstance(conv[k - 1], dict) and conv[k - 1].get("role") == "assistant":
                k -= 1
            return conv[:k], conv[k:]

        prompt, chosen = split(chosen)
        prompt_r, rejected = split(rejected)
        if prompt != prompt_r:
            raise SampleFormatError("chosen and rejected conversations have different prompts (messages before the final assistant turns)")
    prompt = _apply_system(prompt, new_system_prompt)
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp:
            raise SampleFormatError(f"{name} response is empty")
        for j, m in enumerate(resp):
            if not isinstance(m, dict) or m.get("role", "assistant") not in ("assistant", "tool"):
                raise SampleFormatError(f"{name} response message {j} must be an assistant turn")
    full_c = validate_messages(prompt + [dict(m, role=m.get("role", "assistant")) for m in chosen])
    full_r = validate_messages(prompt + [dict(m, role=m.get("role", "assistant")) for m in rejected])
    n = len(prompt)
    return {"prompt": full_c[:n], "chosen": full_c[n:], "rejected": full_r[n:], "tools": _tools(record)}
