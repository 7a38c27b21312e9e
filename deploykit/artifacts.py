"""Artifact directories that are either complete or absent.

Each stage writes into a temporary sibling of its target directory and renames
it into place only when everything inside is written, so an interrupted or
failed run never leaves a half-written directory where a user (or the next
stage) would read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputExistsError


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``target`` on success.

    On any exception the scratch directory is removed and ``target`` is left as
    it was. With ``overwrite`` an existing target is replaced only after the new
    one is complete.
    """
    target = Path(target)
    ensure_writable(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
    try:
        yield scratch
        if target.exists():
            # Move the old one aside first so there is never a moment with
            # neither the old nor the new directory in place.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "d")
            os.replace(scratch, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def ensure_writable(target: Path, *, overwrite: bool) -> None:
    """Fail early, before any expensive work, if ``target`` may not be written."""
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"output directory {target} already exists; choose another --out or pass --overwrite"
        )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` once the block has written it;
    on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # two writers never share one
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: str | os.PathLike) -> None:
    """safetensors.torch.save_file with the usual file mode: it creates files 0600,
    which would make a shared artifact directory unreadable to the rest of a team."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file so a reader never sees half of it."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
