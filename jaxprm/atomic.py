"""Atomic file writes: a reader sees the old file or the new one, never a part of either.

Every writer in jaxprm that must survive a kill goes through ``atomic_open``: the data goes to a
uniquely named temporary file in the target's directory (same file system), is flushed and
fsync'd, then renamed over the target (``os.replace``) and the directory is fsync'd so the rename
itself is durable. On any error (or a ``KeyboardInterrupt``) the temporary file is removed and
the target is left as it was. The new file gets the mode an ordinary ``open`` would give it
(``0o666`` less the umask), not ``mkstemp``'s ``0o600``.

    with atomic_open(path, "w") as f:        # streamed (large or many parts)
        for line in lines: f.write(line)
    atomic_write_text(path, text)
    atomic_write_bytes(path, data)
    atomic_write_json(path, obj, indent=2)   # json.dumps(obj, **kw) + "\\n"
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (makes a rename or a new file in it durable); a no-op where unsupported."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing (``mode`` ``"w"`` or ``"wb"``); when the
    block ends without an exception it replaces ``path``. Parent directories are created."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """``json.dumps(obj, **dumps_kwargs)`` and a newline, written atomically. The text is built
    before the file is touched, so an object that does not serialise leaves no trace."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir"]
