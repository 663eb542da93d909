"""Text sources: the offline starter corpus, local files and folders, and Hugging Face datasets (streamed).

`open_corpus(spec)` reads the CLI's `--corpus` value: `starter`, a path, or `hf:DATASET_ID`. Every source is
a re-iterable stream of documents (strings) in a deterministic order for a given seed, which is what lets an
interrupted harvest skip what it already did and continue.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import MonoscopeError
from .starter import starter_documents

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
# Plain-text files are split at blank lines into documents of about this many characters.
_TEXT_DOC_CHARS = 4000


@dataclass
class Corpus:
    """A named, seeded stream of documents."""

    spec: str
    seed: int = 0
    text_column: str = "text"
    split: str = "train"
    dataset_config: str | None = None
    _files: list[Path] = field(default_factory=list, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "seed": self.seed,
            "text_column": self.text_column,
            "split": self.split,
            "dataset_config": self.dataset_config,
        }

    def documents(self) -> Iterator[str]:
        produced = False
        for text in self._raw_documents():
            if text and text.strip():
                produced = True
                yield text
        if not produced:
            raise MonoscopeError(f"corpus {self.spec!r} contains no text")

    def _raw_documents(self) -> Iterator[str]:
        if self.spec == "starter" or self.spec.startswith("starter:"):
            for doc in starter_documents(self.seed, starter_kinds(self.spec)):
                yield doc.text
        elif self.spec.startswith("hf:"):
            yield from _hf_documents(self.spec[3:], self.split, self.dataset_config, self.text_column, self.seed)
        else:
            for path in self._files:
                yield from _file_documents(path, self.text_column)


def starter_kinds(spec: str) -> tuple[str, ...] | None:
    """The kinds of `starter:KIND,KIND` (None for plain `starter`: every kind)."""
    if not spec.startswith("starter:"):
        return None
    from .starter import STARTER_KINDS

    kinds = tuple(k.strip() for k in spec.split(":", 1)[1].split(",") if k.strip())
    unknown = sorted(set(kinds) - set(STARTER_KINDS))
    if not kinds or unknown:
        raise MonoscopeError(
            f"starter corpus kinds {spec.split(':', 1)[1]!r}: use a comma-separated list of {', '.join(STARTER_KINDS)}"
        )
    return kinds


def open_corpus(
    spec: str, *, seed: int = 0, text_column: str = "text", split: str = "train", dataset_config: str | None = None
) -> Corpus:
    """Check a corpus spec now (missing path, unsupported files) so errors come before any model work."""
    spec = spec.strip()
    if not spec:
        raise MonoscopeError("empty corpus spec; use starter, a file or folder, or hf:DATASET_ID")
    corpus = Corpus(spec=spec, seed=seed, text_column=text_column, split=split, dataset_config=dataset_config)
    if spec.startswith("starter:"):
        starter_kinds(spec)
        return corpus
    if spec == "starter" or spec.startswith("hf:"):
        if spec == "hf:":
            raise MonoscopeError("hf: needs a dataset id, e.g. hf:roneneldan/TinyStories")
        return corpus
    path = Path(spec).expanduser()
    if not path.exists():
        raise MonoscopeError(f"corpus {spec!r} is neither 'starter', 'hf:DATASET_ID', nor an existing file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise MonoscopeError(f"folder {spec} has no {', '.join(SUPPORTED_SUFFIXES)} files")
    else:
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise MonoscopeError(
                f"cannot read {path.name}: corpus files must end in one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        files = [path]
    # A seeded file order mixes sources in a folder while staying reproducible.
    random.Random(seed).shuffle(files)
    corpus._files = files
    return corpus


def _split_text(text: str) -> Iterator[str]:
    chunk: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        chunk.append(paragraph)
        size += len(paragraph) + 2
        if size >= _TEXT_DOC_CHARS:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "\n\n".join(chunk)


def _column_error(source: str, column: str, available: list[str]) -> MonoscopeError:
    return MonoscopeError(
        f"{source} has no text column {column!r}; available columns: {', '.join(available) or 'none'} (use --text-column)"
    )


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield from _split_text(path.read_text(encoding="utf-8", errors="replace"))
    elif suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MonoscopeError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
                if isinstance(row, str):
                    yield row
                    continue
                if not isinstance(row, dict) or text_column not in row:
                    raise _column_error(f"{path}:{line_no}", text_column, list(row) if isinstance(row, dict) else [])
                yield str(row[text_column])
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise MonoscopeError("reading Parquet needs pyarrow: pip install 'monoscope[hf]'") from err
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if text_column not in names:
            raise _column_error(str(path), text_column, names)
        for batch in parquet.iter_batches(columns=[text_column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield str(value)


def _hf_documents(dataset_id: str, split: str, config: str | None, text_column: str, seed: int) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise MonoscopeError("hf: corpora need the datasets package: pip install 'monoscope[hf]'") from err
    try:
        stream = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for missing/unreachable datasets
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MonoscopeError(f"could not open dataset {dataset_id!r} (split {split!r}): {first_line[:300]}") from err
    names = list(stream.column_names or [])
    if names and text_column not in names:
        raise _column_error(f"dataset {dataset_id}", text_column, names)
    stream = stream.shuffle(seed=seed, buffer_size=1000)
    for row in stream:
        if text_column not in row:
            raise _column_error(f"dataset {dataset_id}", text_column, list(row))
        value = row[text_column]
        if value is not None:
            yield str(value)
