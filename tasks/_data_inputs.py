"""The data a config's dataset section reads, resolved without loading a tokenizer or a record.

Two users: the pack task's cache key (a stamp of every data file, so a file changed in place is packed
again) and the pre-flight validation (every named file exists, a Hub dataset exists). The files come from
the engine's own :class:`mirotrain.data.sources.SourceSpec` (globs, lists, ``{split: files}`` mappings and
fsspec URLs expanded exactly as packing will expand them).
"""

from __future__ import annotations

import inspect
from typing import Any

from mirotrain.data.sources import SourceSpec
from mirotrain.hub import info_stamp


def section_source(section: dict[str, Any]) -> SourceSpec:
    """The :class:`SourceSpec` a dataset section describes; ``source`` defaults to its component's default."""
    from mirotrain.config import resolve_component

    source = section.get("source")
    if source is None:
        default = inspect.signature(resolve_component(section["_component_"])).parameters.get("source")
        source = default.default if default is not None and default.default is not inspect.Parameter.empty else "json"
    return SourceSpec(source=str(source), data_files=section.get("data_files"), split=section.get("split", "train"),
                      load_kwargs={"revision": section["revision"]} if section.get("revision") else {})


def is_hub_dataset(spec: SourceSpec) -> bool:
    """A Hub dataset id (``org/name``) read through ``datasets``, as opposed to files in a known format."""
    return not spec.is_local_format and not spec.data_files and "/" in spec.source


def file_stamp(url: str) -> dict[str, Any]:
    """``{url, size, mtime / etag ...}`` from the file's fsspec info; FileNotFoundError if it is missing."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return {"url": url, **info_stamp(fs.info(path))}


def data_stamps(spec: SourceSpec) -> list[dict[str, Any]]:
    """A stamp per data file (FileNotFoundError when a glob matches nothing or a named file is missing)."""
    return [file_stamp(url) for url in spec.expand_files()] if spec.data_files else []
