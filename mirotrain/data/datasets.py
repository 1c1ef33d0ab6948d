"""Dataset builders named in configs (``mirotrain.datasets.odr_chat_dataset`` and the torchtune names).

A builder returns a description of the data plus the code that turns one raw record into tokens
(:meth:`SFTDataset.encode`: format -> messages -> :class:`mirotrain.data.render.ChatRenderer` -> the one
cut of :class:`mirotrain.data.truncation.Truncation` -> shifted labels); it does not read or tokenise
anything up front. The offline writer (:mod:`mirotrain.data.pack_shards`) and the streaming loader
(:mod:`mirotrain.data.streaming`) drive the same ``encode``, so every mode renders and masks samples
identically. Packing keys of the ``dataset`` section (``packed``, ``streaming_pack``, ``packed_seq_len``,
``output_dir``, ...) are accepted here and kept in :attr:`SFTDataset.options`; their rules (exclusive modes,
a required ``packed_seq_len``, ``packed_seq_len >= tokenizer.max_seq_len``) are checked once, by the config
validation (mirotrain/config/), before a dataset is built.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from mirotrain.config.schema import DATASET_KEYS, DatasetConfig
from mirotrain.data.errors import DataError, SampleFormatError
from mirotrain.data.formats import converter_for, preference_to_messages
from mirotrain.data.sources import SourceSpec, iter_records
from mirotrain.data.render import MASKING_STRATEGIES, ChatRenderer
from mirotrain.data.truncation import SampleTooLong, Truncation

IGNORE_INDEX = -100
CLEANED_ALPACA = "yahma/alpaca-cleaned"


@dataclass
class Encoded:
    """One tokenised SFT document: ids and shifted labels (int32)."""

    input_ids: np.ndarray
    labels: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedPair:
    """A tokenised preference pair: two documents sharing a prompt."""

    chosen: Encoded
    rejected: Encoded

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def shift_labels(ids: list[int], mask: list[bool]) -> np.ndarray:
    """labels[t] = ids[t+1] if token t+1 is trained else -100; the last position has no target."""
    ids_a = np.asarray(ids, dtype=np.int32)
    m = np.asarray(mask, dtype=bool)
    labels = np.full(len(ids_a), IGNORE_INDEX, dtype=np.int32)
    if len(ids_a) > 1:
        labels[:-1] = np.where(m[1:], ids_a[1:], IGNORE_INDEX)
    return labels


def fit_document(ids: list[int], mask: list[bool], truncation: Truncation, limit: int | None) -> Encoded:
    """A rendered sample cut to ``limit`` by ``truncation``, with its shifted labels."""
    kept_ids, kept_mask = truncation.fit(ids, mask, limit)
    return Encoded(np.asarray(kept_ids, dtype=np.int32), shift_labels(kept_ids, kept_mask), truncated=len(kept_ids) < len(ids))


class Filtered(Exception):
    """A sample removed by the user's ``filter_fn`` (counted as filtered, not as bad)."""


class _BaseDataset:
    kind = "base"
    # Preference pairs only: one pair per packed row instead of several (the DPO section's one_pair_per_row:
    # ``with_one_pair_per_row``). It changes the rows, so the fingerprint covers it when set.
    one_pair_per_row = False

    def __init__(self, tokenizer: Any, source: SourceSpec, options: DatasetConfig, hash_fields: dict):
        self.tokenizer = tokenizer
        self.source = source
        self.options = options
        self._hash_fields = hash_fields
        self._records: list[tuple[Any, str]] | None = None
        self.render = ChatRenderer(tokenizer)
        self.truncation = Truncation.of(tokenizer)

    # -- limits -----------------------------------------------------------------------------------
    def doc_limit(self) -> int | None:
        """The longest document kept: ``min(tokenizer.max_seq_len, packed_seq_len)``."""
        limits = [v for v in (self.tokenizer.max_seq_len, self.options.packed_seq_len) if v]
        return int(min(limits)) if limits else None

    def fingerprint(self) -> str:
        """Hash of inputs + tokenizer + every option that changes the packed output."""
        h = hashlib.sha256()
        h.update(json.dumps({"kind": self.kind, "fields": self._hash_fields, "pack_seed": self.options.pack_seed,
                             "packed_seq_len": self.options.packed_seq_len, "packed": self.options.packed,
                             "on_bad_sample": self.options.on_bad_sample, **self._layout()}, sort_keys=True,
                            default=str).encode())
        h.update(self.source.fingerprint().encode())
        h.update(self.tokenizer.fingerprint().encode())
        return h.hexdigest()

    def with_one_pair_per_row(self, one_pair_per_row: bool) -> "_BaseDataset":
        """This preference dataset as packed with the DPO section's ``one_pair_per_row`` (True: one pair per row,
        MiroTrain's meaning of batch_size; False: as many as fit), as a copy, so the dataset a builder made is
        never changed. The key is the DPO section's, not a builder argument (the config checks take a builder's
        arguments for keys of the dataset section), so it is given here rather than to the builders."""
        laid_out = copy.copy(self)
        laid_out.one_pair_per_row = one_pair_per_row
        return laid_out

    def _layout(self) -> dict:
        """The row layout options beyond the section's keys, hashed only when set (older caches stay valid)."""
        return {"one_pair_per_row": True} if self.one_pair_per_row else {}

    def iter_records(self):
        return iter_records(self.source)

    def records(self) -> list[tuple[Any, str]]:
        if self._records is None:
            self._records = list(self.iter_records())
        return self._records

    def origin(self) -> str:
        """Where the samples come from, for messages: the data files, else the source."""
        return str(self.source.data_files or self.source.source)

    def describe(self) -> dict:
        """The inputs and options of the rows, for the shard manifest."""
        return {"source": self.source.source, "data_files": self.source.data_files, "split": self.source.split,
                **self._hash_fields, "pack_seed": self.options.pack_seed}

    def encode(self, record: Any, where: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_or_report(self, record: Any, where: str) -> tuple[str, Any]:
        """``("ok", encoded)`` | ``("drop", reason)`` | ``("skip", message)`` | ``("filter", where)``.

        Bad input raises :class:`DataError` (file and line) unless ``on_bad_sample: skip``.
        """
        try:
            if isinstance(record, DataError):
                raise record
            return "ok", self.encode(record, where)
        except SampleTooLong as exc:
            return "drop", f"{where}: {exc}"
        except Filtered:
            return "filter", where
        except DataError as exc:
            if self.options.on_bad_sample == "skip":
                return "skip", str(exc)
            raise
        except (SampleFormatError, ValueError, TypeError, KeyError) as exc:
            err = DataError(where, str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}")
            if self.options.on_bad_sample == "skip":
                return "skip", str(err)
            raise err from None


class SFTDataset(_BaseDataset):
    """Conversations (agent traces, OpenAI, ShareGPT, Alpaca) for supervised fine-tuning."""

    kind = "sft"

    def __init__(self, tokenizer: Any, source: SourceSpec, options: DatasetConfig, convert: Callable[[dict], dict],
                 masking_strategy: str, filter_fn: Callable | None, hash_fields: dict):
        super().__init__(tokenizer, source, options, hash_fields)
        if masking_strategy not in MASKING_STRATEGIES:
            raise ValueError(f"masking_strategy must be one of {MASKING_STRATEGIES}, got {masking_strategy!r}")
        self.convert = convert
        self.masking_strategy = masking_strategy
        self.filter_fn = filter_fn

    def encode(self, record: Any, where: str) -> Encoded:
        if self.filter_fn is not None and not self.filter_fn(record):
            raise Filtered()
        conv = self.convert(record)
        ids, mask = self.render(conv["messages"], tools=conv.get("tools"), masking_strategy=self.masking_strategy)
        return fit_document(ids, mask, self.truncation, self.doc_limit())


class PreferenceDataset(_BaseDataset):
    """Preference pairs for DPO: a shared prompt and chosen/rejected responses (trained = response turns)."""

    kind = "dpo"

    def __init__(self, tokenizer: Any, source: SourceSpec, options: DatasetConfig, columns: dict, new_system_prompt: str | None,
                 hash_fields: dict):
        super().__init__(tokenizer, source, options, hash_fields)
        self.columns = columns
        self.new_system_prompt = new_system_prompt

    def to_messages(self, record: Any) -> dict:
        return preference_to_messages(record, new_system_prompt=self.new_system_prompt, **self.columns)

    def encode_doc(self, prompt: list, response: list, tools: list | None) -> Encoded:
        ids, mask = self.render(prompt + response, tools=tools, train_from=len(prompt))
        return fit_document(ids, mask, self.truncation, self.tokenizer.max_seq_len)

    def encode(self, record: Any, where: str) -> EncodedPair:
        pair = self.to_messages(record)
        c = self.encode_doc(pair["prompt"], pair["chosen"], pair["tools"])
        r = self.encode_doc(pair["prompt"], pair["rejected"], pair["tools"])
        self.truncation.check_pair(len(c), len(r), self.options.packed_seq_len)
        return EncodedPair(c, r)


class ConcatDataset(_BaseDataset):
    """A dataset list (MiroTrain's ConcatDataset): every part's records, in list order, each encoded by its own
    part, so the rows are packed from all of them together. The parts share the tokenizer and the engine options
    (``DatasetConfig.engine_options``); the fingerprint covers every part."""

    def __init__(self, parts: list[_BaseDataset]):
        kinds = sorted({p.kind for p in parts})
        if len(kinds) != 1:
            raise ValueError(f"a dataset list concatenates datasets of one kind, got {', '.join(kinds)}")
        first = parts[0]
        super().__init__(first.tokenizer, first.source, first.options, {"parts": [p._hash_fields for p in parts]})
        self.kind = first.kind
        self.parts = parts

    def fingerprint(self) -> str:
        layout = [self._layout()] if self.one_pair_per_row else []
        parts = [self.kind] + [p.fingerprint() for p in self.parts] + layout
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def iter_records(self):
        for i, part in enumerate(self.parts):
            for record, where in part.iter_records():
                yield (i, record), where

    def encode_or_report(self, record: Any, where: str) -> tuple[str, Any]:
        part, raw = record
        return self.parts[part].encode_or_report(raw, where)

    def origin(self) -> str:
        return " + ".join(p.origin() for p in self.parts)

    def describe(self) -> dict:
        return {"parts": [p.describe() for p in self.parts], "pack_seed": self.options.pack_seed}


# -- builders -----------------------------------------------------------------------------------------

def _options(kw: dict) -> DatasetConfig:
    """Take the section's engine keys (packing and loading options) out of the builder's arguments."""
    return DatasetConfig.from_node({k: kw.pop(k) for k in list(kw) if k in DATASET_KEYS})


def _source(source: str, data_files: Any, split: str, kw: dict) -> SourceSpec:
    fld = kw.pop("field", None)
    if source in ("json", "jsonl", "parquet"):
        if kw:
            raise ValueError(f"unknown dataset option(s) {', '.join(sorted(kw))} for source {source!r}")
    return SourceSpec(source=source, data_files=data_files, split=split, field=fld, load_kwargs=kw)


def _strategy(masking_strategy: str | None, train_on_input: bool | None, default: str = "train_on_assistant") -> str:
    if train_on_input:
        return "train_on_all"
    return masking_strategy or default


def odr_chat_dataset(
    tokenizer: Any,
    *,
    source: str = "json",
    data_files: Any = None,
    conversation_column: str | None = "messages",
    conversation_style: str = "traces",
    train_on_input: bool = False,
    new_system_prompt: str | None = None,
    filter_fn: Callable | None = None,
    split: str = "train",
    masking_strategy: str = "train_on_assistant",
    **kwargs: Any,
) -> SFTDataset:
    """Agent traces (``{"messages": [...]}``), or OpenAI / ShareGPT conversations via ``conversation_style``."""
    options = _options(kwargs)
    spec = _source(source, data_files, split, kwargs)
    strategy = _strategy(masking_strategy, train_on_input)
    convert = converter_for(conversation_style, conversation_column, new_system_prompt)
    fields = {"style": conversation_style, "column": conversation_column, "system": new_system_prompt,
              "strategy": strategy, "filter": getattr(filter_fn, "__qualname__", None)}
    return SFTDataset(tokenizer, spec, options, convert, strategy, filter_fn, fields)


def chat_dataset(tokenizer: Any, *, source: str = "json", conversation_style: str = "openai",
                 conversation_column: str | None = None, **kwargs: Any) -> SFTDataset:
    """torchtune ``chat_dataset``: OpenAI or ShareGPT conversations."""
    return odr_chat_dataset(tokenizer, source=source, conversation_style=conversation_style,
                            conversation_column=conversation_column, **kwargs)


def alpaca_dataset(
    tokenizer: Any,
    *,
    source: str = "tatsu-lab/alpaca",
    data_files: Any = None,
    column_map: dict | None = None,
    train_on_input: bool = True,
    masking_strategy: str | None = None,
    new_system_prompt: str | None = None,
    filter_fn: Callable | None = None,
    split: str = "train",
    **kwargs: Any,
) -> SFTDataset:
    """Alpaca instruction data. ``train_on_input`` defaults to True as in torchtune's ``alpaca_dataset``."""
    from mirotrain.data.formats import alpaca_to_messages

    options = _options(kwargs)
    spec = _source(source, data_files, split, kwargs)
    strategy = masking_strategy or ("train_on_all" if train_on_input else "train_on_assistant")
    convert = lambda r: alpaca_to_messages(r, new_system_prompt, column_map)  # noqa: E731
    fields = {"style": "alpaca", "column_map": column_map, "system": new_system_prompt, "strategy": strategy,
              "filter": getattr(filter_fn, "__qualname__", None)}
    return SFTDataset(tokenizer, spec, options, convert, strategy, filter_fn, fields)


def alpaca_cleaned_dataset(tokenizer: Any, **kwargs: Any) -> SFTDataset:
    """torchtune ``alpaca_cleaned_dataset``: :func:`alpaca_dataset`, reading yahma/alpaca-cleaned by default."""
    return alpaca_dataset(tokenizer, **{"source": CLEANED_ALPACA, **kwargs})


# The config checks read a builder's signature for its keys (local data_files, train_on_input, ...): this one
# takes alpaca_dataset's arguments, with its own default source.
alpaca_cleaned_dataset.__signature__ = inspect.signature(alpaca_dataset).replace(parameters=[  # type: ignore[attr-defined]
    p.replace(default=CLEANED_ALPACA) if p.name == "source" else p
    for p in inspect.signature(alpaca_dataset).parameters.values()])
alpaca_cleaned_dataset.__annotations__ = dict(alpaca_dataset.__annotations__)


def preference_dataset(
    tokenizer: Any,
    *,
    source: str = "json",
    data_files: Any = None,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    new_system_prompt: str | None = None,
    split: str = "train",
    column_map: dict | None = None,
    train_on_input: bool = False,
    **kwargs: Any,
) -> PreferenceDataset:
    """Preference pairs for DPO. Pairs are always packed (see :mod:`mirotrain.data.preference`)."""
    if train_on_input:
        raise ValueError("preference_dataset trains only the responses; train_on_input=True is not supported")
    if column_map:
        prompt_column = column_map.get("prompt", prompt_column)
        chosen_column = column_map.get("chosen", chosen_column)
        rejected_column = column_map.get("rejected", rejected_column)
    options = dataclasses.replace(_options(kwargs), packed=True)
    spec = _source(source, data_files, split, kwargs)
    columns = {"prompt_column": prompt_column, "chosen_column": chosen_column, "rejected_column": rejected_column}
    fields = {"columns": columns, "system": new_system_prompt}
    return PreferenceDataset(tokenizer, spec, options, columns, new_system_prompt, fields)


__all__ = ["ConcatDataset", "Encoded", "EncodedPair", "PreferenceDataset", "SFTDataset", "alpaca_cleaned_dataset",
           "alpaca_dataset", "chat_dataset", "odr_chat_dataset", "preference_dataset", "shift_labels"]
