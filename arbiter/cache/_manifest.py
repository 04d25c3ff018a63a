"""The manifest: which fragments exist, how large they are, and what their bytes hash to.

Loaded once and validated whole, so that nothing later has to distrust it: a path
that is absolute or climbs out with ``..`` is refused here, and fragment ids never
name files on disk (the disk tier files a fragment under a hash of its id).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import quote

__all__ = ["FragmentInfo", "Manifest", "disk_name"]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def disk_name(fragment_id: str) -> str:
    """The file name a fragment is stored under in the disk tier: a hash of its id."""
    return hashlib.sha256(fragment_id.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class FragmentInfo:
    """One manifest entry: ``size`` in bytes, lower-case hex ``sha256``, relative ``path``."""

    id: str
    size: int
    sha256: str
    path: str

    def url(self, cdn_url: str) -> str:
        """The fragment's CDN address: ``cdn_url`` (ending in ``/``) joined with its quoted path."""
        return cdn_url + quote(self.path, safe="/")

    def source_file(self, source_dir: Path) -> Path:
        """Where the fragment lies inside a local model folder."""
        return source_dir.joinpath(*PurePosixPath(self.path).parts)


def _check_relative(fragment_id: str, path: object) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"fragment {fragment_id!r}: path must be a non-empty string, got {path!r}")
    if "\x00" in path or "\\" in path:
        raise ValueError(f"fragment {fragment_id!r}: path {path!r} holds a NUL or a backslash")
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or path.startswith("/"):
        raise ValueError(f"fragment {fragment_id!r}: path {path!r} is absolute")
    if ".." in posix.parts:
        raise ValueError(f"fragment {fragment_id!r}: path {path!r} climbs out with '..'")
    if path.endswith("/") or any(part in ("", ".") for part in path.split("/")):
        raise ValueError(f"fragment {fragment_id!r}: path {path!r} is not a plain file path")
    return path


def _entry(fragment_id: object, raw: object) -> FragmentInfo:
    if not isinstance(fragment_id, str) or not fragment_id:
        raise ValueError(f"fragment ids must be non-empty strings, got {fragment_id!r}")
    if not isinstance(raw, Mapping):
        raise ValueError(f"fragment {fragment_id!r}: entry must be an object, got {raw!r}")
    unknown = set(raw) - {"size", "sha256", "path"}
    if unknown:
        raise ValueError(f"fragment {fragment_id!r}: unknown keys {sorted(map(str, unknown))}")
    size = raw.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"fragment {fragment_id!r}: size must be an int >= 0, got {size!r}")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
        raise ValueError(f"fragment {fragment_id!r}: sha256 must be 64 hex digits, got {digest!r}")
    path = _check_relative(fragment_id, raw.get("path", fragment_id))
    return FragmentInfo(fragment_id, size, digest.lower(), path)


class Manifest(Mapping[str, FragmentInfo]):
    """The validated manifest, a read-only mapping of id to `FragmentInfo`.

    ``manifest[id]`` raises ``KeyError`` naming an unknown id.
    """

    __slots__ = ("_by_disk_name", "_entries")

    def __init__(self, entries: Mapping[str, FragmentInfo]) -> None:
        self._entries = dict(entries)
        self._by_disk_name = {disk_name(i): i for i in self._entries}

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> Manifest:
        """Read and validate a manifest file (JSON) or mapping.

        Raises:
            ValueError: malformed JSON or structure, a bad entry, an unsafe path.
            OSError: the file cannot be read.
            TypeError: ``source`` is neither a path nor a mapping.
        """
        if isinstance(source, Mapping):
            data: object = source
        elif isinstance(source, str | os.PathLike):
            text = Path(source).read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                name = os.fspath(source)
                raise ValueError(f"manifest {name!r} is not valid JSON: {exc}") from None
        else:
            raise TypeError(f"manifest must be a path or a mapping, got {source!r}")
        if not isinstance(data, Mapping) or not isinstance(data.get("fragments"), Mapping):
            raise ValueError('manifest must be an object with a "fragments" object')
        fragments: Mapping[object, object] = data["fragments"]
        return cls({str(i): _entry(i, raw) for i, raw in fragments.items()})

    def __getitem__(self, fragment_id: str) -> FragmentInfo:
        if not isinstance(fragment_id, str):
            raise TypeError(f"fragment_id must be a str, got {fragment_id!r}")
        try:
            return self._entries[fragment_id]
        except KeyError:
            raise KeyError(f"fragment {fragment_id!r} is not in the manifest") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def id_for_disk_name(self, name: str) -> str | None:
        """The id whose disk file is called ``name``, or ``None``."""
        return self._by_disk_name.get(name)
