"""Files followed by the ``tail`` source: identity, fingerprint, rotated generations."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

#: How many of a file's first bytes its fingerprint covers (fewer while it is shorter).
FINGERPRINT_BYTES = 256
#: What a rotated generation's name adds to the followed name: ".1", "-20261201"
#: (logrotate's dateext, also with a time), each maybe with a compression suffix.
_GENERATION = re.compile(
    r"(?:\.(?P<number>\d+)|-(?P<date>\d{8}(?:[-_]?\d{2,10})?))"
    r"(?P<compressed>\.(?:gz|bz2|xz|zst|lz4|Z))?"
)
_DECOMPRESS: dict[str, Callable[[str], BinaryIO]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
}


def digest(head: bytes) -> str:
    """The fingerprint of a file's first bytes: 64 bits of BLAKE2b, as hex."""
    return hashlib.blake2b(head, digest_size=8).hexdigest()


@dataclass
class Tailed:
    """One open file being followed."""

    path: str  # the name it is followed under (before any rotation)
    key: str  # "dev:ino"
    handle: BinaryIO
    offset: int  # committed: everything before it is in the queue
    head: int = 0  # how many first bytes the fingerprint covers
    fingerprint: str = ""
    skipping: bool = False  # inside an over-long line, dropping until its end
    skipping_committed: bool = False
    at_eof: bool = False
    rotated_at: float | None = None
    order: int = 0  # rotated generations are read oldest (lowest) first
    saved_at: float = field(default_factory=time.time)  # wall time of the last checkpoint
    partial: bytes = field(default=b"", repr=False)

    def checkpoint(self) -> str:
        self.saved_at = time.time()
        return json.dumps(
            {
                "path": self.path,
                "offset": self.offset,
                "skipping": self.skipping,
                "head": self.head,
                "fingerprint": self.fingerprint,
                "time": round(self.saved_at, 3),
            }
        )

    def same_start(self, head: int, fingerprint: str) -> bool:
        """True if this file still starts with the bytes a fingerprint was taken of."""
        if head == 0:
            return True
        data = os.pread(self.handle.fileno(), head, 0)
        return len(data) == head and digest(data) == fingerprint

    def refresh_fingerprint(self) -> None:
        """Widen the fingerprint to the first bytes read so far (up to FINGERPRINT_BYTES)."""
        wanted = min(FINGERPRINT_BYTES, self.offset)
        if wanted > self.head:
            data = os.pread(self.handle.fileno(), wanted, 0)
            if len(data) == wanted:
                self.head, self.fingerprint = wanted, digest(data)

    def reset(self) -> None:
        self.offset, self.partial, self.skipping = 0, b"", False
        self.head, self.fingerprint = 0, ""
        self.handle.seek(0)


def identity(stat: os.stat_result) -> str:
    """A file's identity, "device:inode": its checkpoint key."""
    return f"{stat.st_dev}:{stat.st_ino}"


def rfc3339(timestamp: float) -> str:
    """A wall-clock time as RFC 3339 UTC text."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def generations(path: str) -> list[tuple[tuple, str, bool]]:
    """The rotated generations of ``path`` in its folder, oldest first.

    Each is (rank, path, compressed). Numbered ones are older the higher their
    number; dated ones are older the earlier their date, and count as older
    than numbered ones if a folder has both.
    """
    folder, name = os.path.split(path)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            if not entry.startswith(name):
                continue
            match = _GENERATION.fullmatch(entry[len(name) :])
            if match is None:
                continue
            number, date = match["number"], match["date"]
            rank = (1, -int(number)) if number is not None else (0, date)
            found.append((rank, os.path.join(folder, entry), match["compressed"] is not None))
    return sorted(found)


def generation_rank(path: str, generation: str) -> tuple | None:
    """Where ``generation`` stands among the generations of ``path`` (None: not one)."""
    if generation == path:
        return (2,)
    folder, name = os.path.split(path)
    entry = os.path.basename(generation)
    if os.path.dirname(generation) != folder or not entry.startswith(name):
        return None
    match = _GENERATION.fullmatch(entry[len(name) :])
    if match is None:
        return None
    return (1, -int(match["number"])) if match["number"] is not None else (0, match["date"])


def compressed_head(path: str, head: int) -> bytes:
    """The first ``head`` bytes of a compressed generation once decompressed (b"" if unknown)."""
    opener = _DECOMPRESS.get(os.path.splitext(path)[1])
    if opener is None or head == 0:
        return b""
    try:
        with opener(path) as handle:
            return handle.read(head)
    except (OSError, EOFError, lzma.LZMAError):
        return b""
