"""Where a run's outputs are, as the operator sees them: absolute paths, file:// links, per-stage summaries.

Artifacts outlive the worker's working directory, so every path they show is absolute (or a URL when it
already is one, e.g. s3:// shards). Link artifacts make the run directory and the export one click away on
the flow-run page; the parent ``post-train`` run repeats each stage's summary so an operator need not open
the subflow pages.
"""

import base64
import re
from pathlib import Path
from typing import Optional

from tasks._runtime import in_run

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def absolute(path: Optional[str]) -> Optional[str]:
    """An absolute local path, or the URL unchanged (None stays None)."""
    if not path or _URL.match(path):
        return path
    return str(Path(path).resolve())


def url(path: str) -> str:
    """A URL for a local path (``file://``) or the URL unchanged."""
    return path if _URL.match(path) else Path(path).resolve().as_uri()


def publish_links(key_prefix: str, links: dict[str, Optional[str]]) -> None:
    """One link artifact per ``label -> path`` (key ``<key_prefix>-<label>``); empty paths are left out."""
    if not in_run():
        return
    from prefect.artifacts import create_link_artifact

    for label, path in links.items():
        if path:
            create_link_artifact(link=url(path), link_text=absolute(path), key=f"{key_prefix}-{label}",
                                 description=f"{key_prefix} {label.replace('-', ' ')}")


def inline_png(png: Optional[str], alt: str) -> str:
    """A markdown image with the PNG's bytes inline (the UI cannot load file:// images); '' without one."""
    if not png or not Path(png).is_file():
        return ""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(Path(png).read_bytes()).decode()})"


def publish_markdown(key: str, text: str, description: str) -> None:
    """A markdown artifact on the current run (nothing outside a run)."""
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=text, key=key, description=description)
