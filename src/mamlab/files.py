"""Reading files mamlab trusts: regular files only, and no more bytes than such a file can hold.

A FIFO, a device or a socket where a checkpoint pointer, weights or a configuration should be must
not hang a command or exhaust its memory; a zip entry must not expand past what an Omniglot
drawing can be. Every such case is a one-line error naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from mamlab.errors import MamlabError

__all__ = ["read_regular", "read_regular_text", "read_json", "KIB", "MIB", "GIB"]

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def read_regular(path: str | os.PathLike[str], limit: int, what: str = "file",
                 error: type[MamlabError] = MamlabError) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    The file is opened without blocking (a FIFO cannot stall the call) and checked on the open
    descriptor, so it cannot be swapped between the check and the read. ``FileNotFoundError`` is
    left to the caller, which knows what a missing file means.

    Raises:
        ``error`` (a MamlabError): not a regular file, or larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file; expected {what}")
        if info.st_size > limit:
            raise error(f"{path}: {info.st_size} bytes, more than the {limit} that {what} can be")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size + 1)  # one byte more shows a file that grew past its size
    finally:
        os.close(fd)
    if len(data) > min(limit, info.st_size):
        raise error(f"{path}: changed while it was read; expected {what}")
    return data


def read_regular_text(path: Path, limit: int, what: str = "file",
                      error: type[MamlabError] = MamlabError) -> str:
    """``read_regular`` decoded as UTF-8 (a decoding error is a one-line ``error``)."""
    try:
        return read_regular(path, limit, what, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected {what}") from None


def read_json(path: Path, what: str, missing: str, limit: int = 16 * MIB) -> Any:
    """The JSON value in ``path``, a regular UTF-8 file of at most ``limit`` bytes.

    Args:
        path: the file.
        what: what it should be, for messages ("a run configuration (config.json)").
        missing: the one-line message when the file does not exist.
        limit: the most bytes such a file can hold.

    Raises:
        MamlabError: missing (``missing``), not a regular file, too large, not UTF-8 or not JSON.
    """
    try:
        return json.loads(read_regular_text(path, limit, what))
    except FileNotFoundError:
        raise MamlabError(missing) from None
    except MamlabError:
        raise
    except (OSError, ValueError) as e:
        raise MamlabError(f"{path}: cannot read {what}: {e}") from None
