import dataclasses
import hashlib
import io
import urllib.error
import zipfile

import pytest

from mamlab.errors import MamlabError
from mamlab.tasks.omniglot import archive as om
from mamlab.tasks.omniglot.archive import download, safe_extract
from mamlab.tasks.omniglot.pool import load_characters

# the fixture's layout (conftest.py): drawings per character and characters per archive
BACKGROUND = 8


class _Opener:
    def __init__(self, payload: bytes | Exception):
        self.payload, self.urls = payload, []

    def __call__(self, url):
        self.urls.append(url)
        if isinstance(self.payload, Exception):
            raise self.payload
        return io.BytesIO(self.payload)


def _pin(monkeypatch, name: str, data: bytes) -> str:
    """Pin ``data``'s hashes for archive ``name`` (a fixture stands in for the real archive)."""
    digest = hashlib.sha256(data).hexdigest()
    fake = dataclasses.replace(om.ARCHIVES[name], sha256=digest, md5=hashlib.md5(data).hexdigest())
    monkeypatch.setitem(om.ARCHIVES, name, fake)
    return digest


def test_download_verifies_and_extracts(omniglot_zips, tmp_path, monkeypatch):
    data = (omniglot_zips / "images_background.zip").read_bytes()
    digest = _pin(monkeypatch, "images_background", data)
    opener = _Opener(data)
    path = download("images_background", tmp_path, sha256=digest.upper(), opener=opener)
    assert path == tmp_path / "images_background.zip" and path.read_bytes() == data
    assert opener.urls == [om.ARCHIVES["images_background"].url]
    # cached: no second fetch, and the pinned hash is checked again
    assert download("images_background", tmp_path, opener=opener) == path and len(opener.urls) == 1
    folder = download("images_background", tmp_path, extract=True, opener=opener)
    assert folder == tmp_path / "images_background" and (folder / "Greek" / "character01").is_dir()
    assert len(load_characters(folder, cache=False)) == BACKGROUND
    assert om.ARCHIVES["images_background"].url.startswith("https://")


def test_every_official_archive_has_a_pinned_sha256_and_md5():
    for archive in om.ARCHIVES.values():
        assert archive.sha256 is not None and len(archive.sha256) == 64 and archive.sha256 == archive.sha256.lower()
        assert archive.md5 is not None and len(archive.md5) == 32
    # as tensorflow_datasets/url_checksums/omniglot.txt pins them (see the comment above ARCHIVES)
    assert om.ARCHIVES["images_background"].sha256.startswith("ad41ab679c8b5d90")
    assert om.ARCHIVES["images_evaluation"].sha256.startswith("1f61a8f336678")


def test_the_real_archives_we_hold_match_their_pins(real_omniglot):
    """Every official archive found in the data folder has its pinned SHA-256 and MD5."""
    held = [a for a in om.ARCHIVES.values() if (real_omniglot / f"{a.name}.zip").is_file()]
    if not held:
        pytest.skip("no official archive in the data folder")
    for archive in held:
        assert om._verify(real_omniglot / f"{archive.name}.zip", archive, None) is None, archive.name


def test_download_rejects_a_wrong_hash(omniglot_zips, tmp_path):
    data = (omniglot_zips / "images_background_small1.zip").read_bytes()
    # the pinned SHA-256 of the real archives does not match the fixture's
    for name in ("images_background_small1", "images_background", "images_evaluation"):
        with pytest.raises(MamlabError, match="failed verification: SHA-256"):
            download(name, tmp_path, opener=_Opener(data))
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob("*.part"))


def test_download_checks_the_md5_too(omniglot_zips, tmp_path, monkeypatch):
    data = (omniglot_zips / "images_evaluation.zip").read_bytes()
    _pin(monkeypatch, "images_evaluation", data)
    wrong_md5 = dataclasses.replace(om.ARCHIVES["images_evaluation"], md5="0" * 32)
    monkeypatch.setitem(om.ARCHIVES, "images_evaluation", wrong_md5)
    with pytest.raises(MamlabError, match="failed verification: MD5"):
        download("images_evaluation", tmp_path, opener=_Opener(data))


def test_nothing_on_disk_or_passed_in_replaces_a_pinned_hash(omniglot_zips, tmp_path):
    data = (omniglot_zips / "images_background.zip").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    # a cached archive with a record of its own hash beside it (as an earlier mamlab wrote) is still
    # checked against the pin: it is fetched again, and the fetched copy fails too
    (tmp_path / "images_background.zip").write_bytes(data)
    (tmp_path / "images_background.zip.sha256").write_text(f"{digest}  images_background.zip\n")
    opener = _Opener(data)
    with pytest.raises(MamlabError, match="failed verification: SHA-256 .* differs from the expected ad41ab"):
        download("images_background", tmp_path, opener=opener)
    assert len(opener.urls) == 1
    with pytest.raises(MamlabError, match="differs from the pinned SHA-256 of images_background .*cannot be "
                                          "replaced") as e:
        download("images_background", tmp_path, sha256=digest, opener=opener)
    assert "\n" not in str(e.value) and len(opener.urls) == 1
    with pytest.raises(MamlabError, match="sha256 must be 64 hexadecimal digits, got 'abc'"):
        download("images_background", tmp_path, sha256="abc", opener=opener)


def test_download_network_error_and_bad_name(tmp_path):
    with pytest.raises(MamlabError, match="could not download .*images_background.zip"):
        download("images_background", tmp_path, opener=_Opener(urllib.error.URLError("offline")))
    with pytest.raises(MamlabError, match="unknown archive 'omniglot'"):
        download("omniglot", tmp_path, opener=_Opener(b""))


@pytest.mark.parametrize("entry", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/evil.txt"])
def test_safe_extract_refuses_escaping_entries(tmp_path, entry):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("ok.txt", "fine")
        info = zipfile.ZipInfo("placeholder")
        info.filename = entry  # ZipInfo() would sanitize the name; a hostile archive does not
        zf.writestr(info, "gotcha")
    target = tmp_path / "out"
    with pytest.raises(MamlabError, match="would land outside"):
        safe_extract(bad, target)
    assert not (tmp_path / "evil.txt").exists() and not (target / "ok.txt").exists()


def test_safe_extract_refuses_symlinks(tmp_path):
    bad = tmp_path / "link.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(MamlabError, match="would land outside"):
        safe_extract(bad, tmp_path / "out")


def test_download_edge_cases_are_one_line(omniglot_zips, tmp_path, monkeypatch):
    data = (omniglot_zips / "images_background.zip").read_bytes()
    _pin(monkeypatch, "images_background", data)
    (tmp_path / "images_background.zip").write_bytes(data)
    (tmp_path / "images_background.zip.sha256").write_text("")  # an empty record: ignored
    assert download("images_background", tmp_path, opener=_Opener(data)) == tmp_path / "images_background.zip"
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(MamlabError, match="cannot use .*a-file.* as the download folder"):
        download("images_background", tmp_path / "a-file", opener=_Opener(data))
