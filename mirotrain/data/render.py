"""Messages -> ``(ids, mask)``: the checkpoint's own chat template, token for token, and the loss mask.

Why not hand-written ChatML: the Qwen3 template treats historical and final assistant turns differently
(think blocks only after the last real user query), renders ``tool`` messages as ``<tool_response>`` blocks
inside a user turn and serialises ``tool_calls`` as JSON; every hand copy drifts. So the text comes from the
tokenizer's template (:meth:`mirotrain.models.qwen3.tokenizer.Qwen3TokenizerAuto.apply_chat_template`) and
is tokenised here, so the ids are exactly what the checkpoint was trained and served with.

How the mask is found: the rendered text is split at the control tokens (``<|im_start|>``, ``<|im_end|>``,
...). A turn is the text between ``<|im_start|>`` and ``<|im_end|>``; it starts with its role header
(``assistant\\n``). Strategies (:data:`MASKING_STRATEGIES`):

* ``train_on_assistant``: every assistant turn's body (after the header: think block, content, tool calls)
  and its closing ``<|im_end|>`` -- including the final one, so single-turn data learns to stop. The newline
  after ``<|im_end|>`` is not trained (generation stops at ``<|im_end|>``);
* ``train_on_last``: only the last assistant turn, marked the same way;
* ``train_on_all``: every token except a leading system turn (the tools block counts as one).

``train_from=k`` trains only assistant messages at index >= k (the responses of a preference pair after
their shared prompt). Because control tokens always split the byte-level BPE, tokenising piece by piece gives
the same ids as tokenising the whole string.

Prompt-injection guard: control-token strings inside *message content* (e.g. a scraped web page containing
``<|im_end|>``) are encoded as plain text unless the tokenizer has ``allow_special_tokens=True``; HF's own
``apply_chat_template(tokenize=True)`` would turn them into real control tokens.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

MASKING_STRATEGIES = ("train_on_assistant", "train_on_last", "train_on_all")

# Private-use sentinels that hide control-token strings found in content while the template renders.
_PH_OPEN, _PH_CLOSE = "\ue0f1", "\ue0f2"


def message_text(content: Any) -> str:
    """Content as one string: a str, None (assistant turns that only call tools) or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError(f"content parts must be {{'type': 'text', 'text': str}}, got {part!r:.80}")
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


class ChatRenderer:
    """Renders conversations with one tokenizer; ``renderer(messages) -> (ids, mask)``, mask True = trained.

    The tokenizer provides the template and the encoding (``control_tokens``, ``allow_special_tokens``,
    ``apply_chat_template``, ``encode_with_offsets``, ``encode_text_batch``); this class decides the mask.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.allow_special_tokens = bool(tokenizer.allow_special_tokens)
        self._control: dict[str, int] = dict(tokenizer.control_tokens)
        names = sorted(self._control, key=len, reverse=True)
        self._names = names
        self._control_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        self._placeholder = {name: f"{_PH_OPEN}{i}{_PH_CLOSE}" for i, name in enumerate(names)}
        self._placeholder_re = re.compile(re.escape(_PH_OPEN) + r"(\d+)" + re.escape(_PH_CLOSE))

    # -- text ---------------------------------------------------------------------------------------
    def render_text(self, messages: Sequence[dict], tools: list | None = None) -> str:
        """The conversation as the template writes it, control-token strings in content hidden (guarded)."""
        return self.tokenizer.apply_chat_template(self._normalize(messages), self._guard_obj(tools) if tools else None)

    def _normalize(self, messages: Sequence[dict]) -> list[dict]:
        out = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise ValueError(f"message {i} must be a mapping, got {type(msg).__name__}")
            m = {"role": msg.get("role"), "content": self._guard(message_text(msg.get("content")))}
            if msg.get("reasoning_content") is not None:
                m["reasoning_content"] = self._guard(message_text(msg["reasoning_content"]))
            if msg.get("tool_calls"):
                m["tool_calls"] = self._guard_obj(msg["tool_calls"])
            out.append(m)
        return out

    def _guard(self, text: str) -> str:
        if self.allow_special_tokens:
            return text
        if _PH_OPEN in text:
            raise ValueError("message content contains the reserved character U+E0F1")
        return self._control_re.sub(lambda m: self._placeholder[m.group(1)], text) if "<|" in text else text

    def _guard_obj(self, obj: Any) -> Any:
        if self.allow_special_tokens:
            return obj
        if isinstance(obj, str):
            return self._guard(obj)
        if isinstance(obj, list):
            return [self._guard_obj(v) for v in obj]
        if isinstance(obj, dict):
            return {k: self._guard_obj(v) for k, v in obj.items()}
        return obj

    # -- ids and mask ---------------------------------------------------------------------------------
    def __call__(self, messages: Sequence[dict], *, tools: list | None = None,
                 masking_strategy: str = "train_on_assistant", train_from: int | None = None) -> tuple[list[int], list[bool]]:
        """The whole sample's ids and mask (no length limit: :mod:`mirotrain.data.truncation` cuts)."""
        if masking_strategy not in MASKING_STRATEGIES:
            raise ValueError(f"masking_strategy must be one of {MASKING_STRATEGIES}, got {masking_strategy!r}")
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        text = self.render_text(messages, tools)
        system_first = bool(tools) or bool(roles and roles[0] == "system")
        plan = self._plan(text, roles, masking_strategy, train_from, system_first)
        if self.allow_special_tokens or _PH_OPEN not in text:
            return self._encode_whole(text, plan)
        return self._encode_pieces(plan)

    def _plan(self, text: str, roles: list, strategy: str, train_from: int | None,
              system_first: bool) -> list[tuple[str, Any, int, int, bool]]:
        """Segments of ``text`` at control tokens: ``(kind, value, char_start, header_len, trained)``.

        ``kind`` is ``"ctl"`` (value = the token id) or ``"txt"`` (value = the text); ``header_len`` is the
        length of a turn's role header, which is never trained except under ``train_on_all``.
        """
        assistant_msg_idx = [i for i, r in enumerate(roles) if r == "assistant"]
        parts = self._control_re.split(text)  # alternates text, control, text, ..., text
        plan: list[tuple[str, Any, int, int, bool]] = []
        in_turn = turn_trained = after_im_start = False
        turn_no = assistant_no = -1
        pos = 0
        for j, part in enumerate(parts):
            start, pos = pos, pos + len(part)
            if j % 2 == 1:  # a control token
                if part == "<|im_start|>":
                    in_turn = True
                    turn_no += 1
                    trained = strategy == "train_on_all" and not (turn_no == 0 and system_first)
                elif part == "<|im_end|>" and in_turn:
                    trained = turn_trained
                    in_turn, turn_trained = False, False
                else:
                    trained = turn_trained if in_turn else strategy == "train_on_all"
                plan.append(("ctl", self._control[part], start, 0, trained))
                after_im_start = part == "<|im_start|>"
                continue
            if not part:
                continue
            header_len = 0
            if after_im_start:  # the body of a new turn: "role\n..."
                role = part.split("\n", 1)[0]
                header_len = len(role) + 1 if "\n" in part else len(part)
                if strategy == "train_on_all":
                    turn_trained = not (turn_no == 0 and system_first)
                    header_len = 0 if turn_trained else header_len
                elif role == "assistant":
                    assistant_no += 1
                    if assistant_no >= len(assistant_msg_idx):
                        raise ValueError("the rendered text has more assistant turns than the messages: "
                                         "a control token inside content? (allow_special_tokens=True)")
                    if train_from is not None:
                        turn_trained = assistant_msg_idx[assistant_no] >= train_from
                    elif strategy == "train_on_last":
                        turn_trained = assistant_no == len(assistant_msg_idx) - 1
                    else:
                        turn_trained = True
                else:
                    turn_trained = False
                trained = turn_trained
            elif in_turn:
                trained = turn_trained
            else:
                trained = strategy == "train_on_all"
            after_im_start = False
            plan.append(("txt", part, start, header_len, trained))
        return plan

    def _encode_whole(self, text: str, plan: list) -> tuple[list[int], list[bool]]:
        """Every control token in ``text`` is the template's own: one encode of the whole string (control
        tokens parsed); each token's char offset finds its segment in ``plan``."""
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        tok_start = np.asarray([o[0] for o in offsets], dtype=np.int64)
        seg = np.searchsorted(np.asarray([p[2] for p in plan]), tok_start, side="right") - 1
        seg_trained = np.asarray([p[4] for p in plan], dtype=bool)
        seg_first = np.asarray([p[2] + p[3] for p in plan], dtype=np.int64)  # first trained char of a segment
        mask = (seg_trained[seg] & (tok_start >= seg_first[seg])).tolist()
        return list(ids), mask

    def _encode_pieces(self, plan: list) -> tuple[list[int], list[bool]]:
        """Content held control-token strings: encode the text pieces with them as plain text."""
        pieces = [self._placeholder_re.sub(lambda m: self._names[int(m.group(1))], value)
                  for kind, value, _, _, _ in plan if kind == "txt"]
        encoded = iter(self.tokenizer.encode_text_batch(pieces))
        ids: list[int] = []
        mask: list[bool] = []
        for kind, value, _, header_len, trained in plan:
            if kind == "ctl":
                ids.append(value)
                mask.append(bool(trained))
                continue
            toks, offsets = next(encoded)
            ids.extend(toks)
            mask.extend((st >= header_len for st, _ in offsets) if trained else [False] * len(toks))
        return ids, mask
