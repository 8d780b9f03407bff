"""Names and keys used across the package: the repository root, short content hashes (cache keys, fingerprints)
and filesystem-safe names."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def short_hash(content: str | bytes | Iterable[bytes], length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of `content` (a string, bytes, or chunks of bytes)."""
    digest = hashlib.sha256()
    chunks = (
        [content.encode() if isinstance(content, str) else content] if isinstance(content, (str, bytes)) else content
    )
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:length]


def slug(text: str, max_length: int = 80) -> str:
    """`text` as a file name: anything but letters, digits, `.`, `_` and `-` becomes `_` (keeps its end)."""
    return _UNSAFE.sub("_", text).strip("_")[-max_length:]
