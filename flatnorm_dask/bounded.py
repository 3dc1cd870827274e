"""Bounded reading of the files a user hands us: statistics files and config files.

A file that is huge, special (a FIFO, a device, a socket), binary, or a YAML document whose aliases could
expand without end must cost a bounded amount of memory and time and end in a one-line reason. This module
holds the one definition of each bound and check; :mod:`flatnorm_dask.formats` and :mod:`flatnorm_dask.config`
use it. It imports only the standard library (PyYAML inside the one function that needs it), so that the
config loader stays quick to import.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

__all__ = [
    "MAX_FILE_BYTES",
    "AliasRefused",
    "RefusedFile",
    "decode_text",
    "read_bytes",
    "read_text",
    "too_large",
    "without_aliases",
]

#: Default size limit of one statistics file (``input.max_file_bytes``). A flat-statistics PropertyList of a
#: 16-amplifier detector is about 4 KB, with ISR metadata a few tens of KB: 4 MiB is a thousand times that,
#: and still parses in about a second on the slow path.
MAX_FILE_BYTES = 4 * 1024 * 1024

# What a non-regular file is, for the message.
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))
# Reads after the first, which asks for the file's size and one byte more (the end seen in the same read).  Below
# glibc's default mmap threshold (128 KiB): a larger buffer is mapped and unmapped at every read where that
# threshold stays fixed, as in dask's worker processes (their nanny sets MALLOC_TRIM_THRESHOLD_), which made
# reading a small file there three times slower.
_READ_CHUNK = 64 << 10


class RefusedFile(ValueError):
    """A file refused before or while reading it: not a regular file, too large, or not text."""


class AliasRefused(ValueError):
    """A YAML document with an alias (``*name``): refused, because aliases can expand without bound.

    ``line`` is the 1-based line of the aliased anchor (``&name``), or None.
    """

    def __init__(self, line: int | None):
        self.line = line
        anchor = f" of the anchor on line {line}" if line is not None else ""
        super().__init__(f"YAML alias (*name){anchor} refused: aliases can expand without bound")


def read_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes.

    The file is opened without blocking (a FIFO without a writer must not hang the open) and checked on the
    open descriptor, not by an earlier ``stat`` that a swap of the file could outrun; at most
    ``max_bytes + 1`` bytes are read, so a file growing meanwhile is caught too.

    Raises
    ------
    OSError
        It cannot be opened or read (``IsADirectoryError`` for a directory).
    RefusedFile
        Not a regular file, or larger than ``max_bytes``.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "a special file")
            raise RefusedFile(f"not a regular file ({kind}): refused, it could block or never end")
        if info.st_size > max_bytes:
            raise too_large(max_bytes, info.st_size)
        chunks, size, want = [], 0, info.st_size + 1
        while size <= max_bytes:
            chunk = os.read(fd, min(want, max_bytes + 1 - size))
            want = _READ_CHUNK
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # a size the file system did not know (or a file still growing)
            raise too_large(max_bytes)
        return b"".join(chunks)
    finally:
        os.close(fd)


def too_large(max_bytes: int, size: int | None = None) -> RefusedFile:
    """The refusal of a file of ``size`` bytes (None: known only to be larger) beyond ``max_bytes``."""
    if size is None:
        return RefusedFile(f"more than the limit of {max_bytes:,} bytes")
    return RefusedFile(f"{size:,} bytes, larger than the limit of {max_bytes:,} bytes")


def decode_text(data: bytes) -> str:
    """UTF-8 text of a file's bytes.

    Raises
    ------
    RefusedFile
        Not UTF-8, or holding a NUL byte (text files never do): a binary or corrupt file.
    """
    nul = data.find(b"\x00")
    if nul >= 0:
        raise RefusedFile(f"NUL byte at byte {nul}: a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RefusedFile(f"not UTF-8 text (byte {err.start}): a binary or corrupt file") from None


def read_text(path: str | os.PathLike, max_bytes: int) -> str:
    """:func:`read_bytes` then :func:`decode_text`."""
    return decode_text(read_bytes(path, max_bytes))


def _first_shared_node(root: Any) -> Any:
    """A node reached twice from ``root`` (what an alias makes), or None; iterative, linear in the nodes."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            return node
        seen.add(id(node))
        value = node.value
        if isinstance(value, list):  # a sequence's nodes or a mapping's (key, value) pairs
            for item in value:
                if isinstance(item, tuple):
                    stack.extend(item)
                else:
                    stack.append(item)
    return None


def without_aliases(loader: type) -> type:
    """A subclass of a PyYAML loader class that refuses documents holding aliases.

    Composing a document links each alias to its anchor's node in constant time; the cost of a
    "billion laughs" document comes later, when it is constructed (merge keys), walked or printed. So the
    composed node graph is checked before construction: a node reached twice is an alias, and the document
    is refused with :class:`AliasRefused`. Works for the C and the pure-Python loaders alike.
    """

    class NoAliases(loader):  # type: ignore[misc, valid-type]
        def construct_document(self, node):
            shared = _first_shared_node(node)
            if shared is not None:
                mark = getattr(shared, "start_mark", None)
                raise AliasRefused(mark.line + 1 if mark is not None else None)
            return super().construct_document(node)

    NoAliases.__name__ = NoAliases.__qualname__ = f"{loader.__name__}WithoutAliases"
    return NoAliases
