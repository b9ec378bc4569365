"""The official Omniglot archives: their records, reading them in place, decoding and resizing the PNGs,
safe extraction, and download with hash verification.

Each image archive holds ``<archive>/<Alphabet>/characterNN/*.png``: 105x105 binary images, black
strokes on white. :class:`ArchiveReader` reads the files of a ``.zip`` or of its extracted folder
alike, by relative POSIX name.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from mamlab.errors import MamlabError, check_choice
from mamlab.files import MIB, read_regular
from mamlab.tasks.omniglot.cache import default_cache_dir

__all__ = [
    "ARCHIVES",
    "Archive",
    "ArchiveReader",
    "decode_png",
    "download",
    "resize_strokes",
    "safe_extract",
]

_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"


@dataclass(frozen=True)
class Archive:
    """One official Omniglot archive: where to fetch it and the hashes that verify it (None: unknown)."""

    name: str
    url: str
    sha256: str | None
    md5: str | None = None


# The SHA-256 of every archive is pinned here and nothing else can replace it (no record on disk, no
# argument). images_background, images_evaluation and the two small sets: as TensorFlow Datasets pins
# them for these same URLs, in tensorflow/datasets, tensorflow_datasets/url_checksums/omniglot.txt
# (commit 90b66237ad09c9e5b9b1bc61b646db7b1fb0713c: 9464212 and 6462886 bytes); the small sets'
# values there equal the ones we measured on our own copies. all_runs: measured on our copy (TFDS
# does not fetch it). The MD5s are torchvision's (``datasets.Omniglot.zips_md5``) and are checked too.
ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        Archive("images_background", _URL + "images_background.zip",
                "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
                "68d2efa1b9178cc56df9314c21c6e718"),
        Archive("images_evaluation", _URL + "images_evaluation.zip",
                "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
                "6b91aef0f799c5bb55b94e3f2daec811"),
        Archive("images_background_small1", _URL + "images_background_small1.zip",
                "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
                "e704a628b5459e08445c13499850abc4"),
        Archive("images_background_small2", _URL + "images_background_small2.zip",
                "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
                "b75a71a51d3b13f821f212756fe481fd"),
        Archive("all_runs", _URL + "one-shot-classification/all_runs.zip",
                "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
                "e8996daecdf12afeeb4a53a179f06b19"),
    )
}


# ----------------------------------------------------------------------------------------------
# Images


def decode_png(data: bytes, where: str = "image") -> np.ndarray:
    """Decode one Omniglot PNG to a boolean stroke mask ``[H, W]`` (True where the ink is black)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            gray = np.asarray(im.convert("L"))
    except Exception as err:  # PIL raises many types for a corrupt file
        raise MamlabError(f"cannot decode {where} as a PNG image: {err}") from None
    return gray < 128


def resize_strokes(strokes: np.ndarray, image_size: int = 28) -> np.ndarray:
    """Antialiased (Lanczos) resize of a stroke mask to ``uint8 [image_size, image_size]``, stroke 255."""
    im = Image.fromarray(np.where(strokes, 255, 0).astype(np.uint8), mode="L")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


class ArchiveReader:
    """Uniform read access to the files of a zip archive or a folder, by relative POSIX name.

    Internal to :mod:`mamlab.tasks.omniglot` (the character pools and the one-shot runs read
    through it). ``names`` lists the files, sorted; ``what`` names the source in error messages.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.zip = path, None
        if not path.exists():
            raise MamlabError(f"{what} {str(path)!r} does not exist; expected a .zip archive or an "
                              "extracted folder")
        if path.is_dir():
            self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            return
        try:
            self.zip = zipfile.ZipFile(path)
            self.names = sorted(n for n in self.zip.namelist() if not n.endswith("/"))
        except (zipfile.BadZipFile, OSError) as err:
            raise MamlabError(f"{what} {str(path)!r} is not a readable zip archive ({err}); expected "
                              "an official Omniglot .zip or an extracted folder") from None

    #: The most bytes one file of the release may expand to (a 105x105 PNG is a few kB).
    MAX_ENTRY = 4 * MIB

    def read(self, name: str) -> bytes:
        """The bytes of the file ``name`` (one of ``names``), at most ``MAX_ENTRY`` of them."""
        where = f"{str(self.path)!r}"
        try:
            if self.zip is None:
                return read_regular(self.path / name, self.MAX_ENTRY, "an Omniglot file")
            info = self.zip.getinfo(name)
            if info.file_size > self.MAX_ENTRY:
                raise MamlabError(f"{name!r} in {where} expands to {info.file_size} bytes, more than an "
                                  f"Omniglot file can be ({self.MAX_ENTRY}); the archive is not the release")
            with self.zip.open(info) as f:  # the header may lie: never read past the bound
                data = f.read(self.MAX_ENTRY + 1)
            if len(data) > self.MAX_ENTRY:
                raise MamlabError(f"{name!r} in {where} expands past {self.MAX_ENTRY} bytes; the archive is "
                                  "not the release")
            return data
        except (OSError, zipfile.BadZipFile, KeyError, RuntimeError, NotImplementedError, EOFError) as err:
            # RuntimeError: an encrypted entry; NotImplementedError: an unknown compression method
            raise MamlabError(f"cannot read {name!r} from {where}: {err}") from None

    def close(self) -> None:
        """Close the zip file, if any."""
        if self.zip is not None:
            self.zip.close()


# ----------------------------------------------------------------------------------------------
# Download and safe extraction


def safe_extract(zip_path: str | Path, target: str | Path) -> Path:
    """Extract ``zip_path`` into ``target``, refusing (before writing anything) entries that would land
    outside it: absolute paths, ``..`` components, drive letters, symbolic links."""
    zip_path, target = Path(zip_path), Path(target)
    base = target.resolve()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                name = info.filename
                parts = name.replace("\\", "/").split("/")
                dest = (base / name).resolve()
                bad = (name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name)
                       or stat.S_ISLNK(info.external_attr >> 16)
                       or (dest != base and base not in dest.parents))
                if bad:
                    raise MamlabError(f"refusing to extract {str(zip_path)!r}: entry {name!r} would land "
                                      f"outside {str(target)!r}")
            target.mkdir(parents=True, exist_ok=True)
            zf.extractall(target)
    except (zipfile.BadZipFile, OSError) as err:
        raise MamlabError(f"cannot extract {str(zip_path)!r}: {err}") from None
    return target


def _hashes(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _verify(path: Path, archive: Archive, sha256: str | None) -> str | None:
    """None if ``path`` has every hash known for ``archive``, else why not.

    Every hash that is known must match: the pinned SHA-256, the MD5 and a ``sha256`` the caller
    gives. Nothing on disk is consulted (a ``.sha256`` file beside the archive is ignored), so no
    file can stand in for a pinned hash or skip the MD5.
    """
    got_sha, got_md5 = _hashes(path)
    for want in (archive.sha256, sha256):
        if want is not None and got_sha != want.lower():
            return f"SHA-256 {got_sha} differs from the expected {want.lower()}"
    if archive.md5 is not None and got_md5 != archive.md5:
        return f"MD5 {got_md5} differs from the expected {archive.md5}"
    return None


def download(name: str, cache_dir: str | Path | None = None, *, sha256: str | None = None,
             extract: bool = False, opener: Callable[[str], BinaryIO] | None = None) -> Path:
    """Fetch an official archive into ``cache_dir`` (once) and verify it.

    Args:
        name: ``images_background``, ``images_evaluation``, ``images_background_small1``,
            ``images_background_small2`` or ``all_runs``.
        cache_dir: destination folder (default ``default_cache_dir()``).
        sha256: a SHA-256 the archive must also have. It cannot replace the pinned one
            (``ARCHIVES``): a different value is an error.
        extract: also extract it (safely, see :func:`safe_extract`) and return the folder.
        opener: ``url -> binary file object`` (default ``urllib.request.urlopen``); tests inject one.

    Returns:
        The verified ``<cache_dir>/<name>.zip``, or its extracted folder.
    """
    check_choice("archive", name, tuple(ARCHIVES))
    archive = ARCHIVES[name]
    if sha256 is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise MamlabError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
        if archive.sha256 is not None and sha256.lower() != archive.sha256:
            raise MamlabError(f"sha256 {sha256} differs from the pinned SHA-256 of {name} "
                              f"({archive.sha256}); the pinned hash cannot be replaced")
    if archive.sha256 is None and archive.md5 is None:
        raise MamlabError(f"no hash is known for {name}; it cannot be verified")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where the folder should be, no permission, ...
        raise MamlabError(f"cannot use {str(folder)!r} as the download folder: "
                          f"{err.strerror or err}") from None
    dest = folder / f"{name}.zip"
    if not dest.is_file() or _verify(dest, archive, sha256) is not None:
        fd, tmp_name = tempfile.mkstemp(dir=folder, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, (opener or urllib.request.urlopen)(archive.url) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
            problem = _verify(tmp, archive, sha256)
            if problem:
                raise MamlabError(f"download of {archive.url} failed verification: {problem}")
            os.replace(tmp, dest)
        except (urllib.error.URLError, OSError) as err:
            raise MamlabError(f"could not download {archive.url} ({err}); fetch it by hand into "
                              f"{str(folder)!r}") from None
        finally:
            tmp.unlink(missing_ok=True)
    if not extract:
        return dest
    with zipfile.ZipFile(dest) as zf:
        tops = {n.split("/")[0] for n in zf.namelist()}
    if tops == {name}:
        return safe_extract(dest, folder) / name
    return safe_extract(dest, folder / name)
