"""Atomic file writes and small JSON helpers.

Every file a run produces is written to a temporary sibling first and renamed into place, so a crash or a
full disk never leaves a half-written file where a reader expects a whole one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from .errors import MonoscopeError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


def _temp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; results should be as readable as any other file
    os.close(fd)
    return Path(tmp)


def make_readable(folder: str | os.PathLike) -> None:
    """Give a folder made with mkdtemp (0700) and its files (some writers make 0600 ones) the modes the umask
    gives any other folder and file, before it is renamed into a shared cache."""
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~_current_umask())
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 & ~_current_umask()) if item.is_dir() else _FILE_MODE)


def _commit(tmp: Path, path: Path) -> None:
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _disk_error(path: Path, err: OSError) -> MonoscopeError:
    return MonoscopeError(
        f"could not write {path}: {err.strerror or err}. Free some disk space or choose another folder; nothing already saved was changed."
    )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        tmp.write_bytes(data)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, err) from err
    _commit(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {})
        )
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MonoscopeError(f"{path} does not exist") from err
    except json.JSONDecodeError as err:
        raise MonoscopeError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
