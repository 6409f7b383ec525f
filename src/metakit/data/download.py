"""Fetching a file over HTTP(S) with a progress bar, written atomically."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from tqdm import tqdm


class DataError(RuntimeError):
    """Missing or damaged data; the message says which files to put where."""


def download(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``, renamed when complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}",
                      disable=None) as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise OSError(f"incomplete download: {part.stat().st_size} of {total} bytes")
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    return dest


def fetch_or_explain(url: str, dest: Path, what: str, allow_download: bool = True) -> Path:
    """Return ``dest``; download it from ``url`` if missing, else raise one clear DataError."""
    dest = Path(dest)
    if dest.exists():
        return dest
    reason = "downloading is switched off"
    if allow_download:
        try:
            return download(url, dest)
        except Exception as exc:  # network down, HTTP error, disk full...
            reason = f"the download failed ({type(exc).__name__}: {exc})"
    raise DataError(f"{what} not found: put {dest.name} in {dest.parent} (from {url}); {reason}")


def is_writable(path: Path) -> bool:
    """Writable by us *and* meant to be: a path without write bits counts as read-only, for root too
    (a data mirror laid out read-only must not receive caches just because root may write anywhere)."""
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


def writable_dir(preferred: Path, fallback: Path) -> Path:
    """``preferred`` when it can be created and written, else ``fallback`` (created)."""
    existing = preferred
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if is_writable(existing):
        try:
            preferred.mkdir(parents=True, exist_ok=True)
            if is_writable(preferred):
                return preferred
        except OSError:
            pass
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else ``$METAKIT_DATA``, else ``~/.cache/metakit``."""
    if root is None:
        root = os.environ.get("METAKIT_DATA") or Path.home() / ".cache" / "metakit"
    return Path(root).expanduser()


def cache_root() -> Path:
    """Where decoded caches go when the data root is read-only: ``$METAKIT_CACHE`` or ``~/.cache/metakit``."""
    return Path(os.environ.get("METAKIT_CACHE") or Path.home() / ".cache" / "metakit").expanduser()

