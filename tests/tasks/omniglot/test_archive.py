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


def test_download_verifies_and_extracts(omniglot_zips, tmp_path):
    data = (omniglot_zips / "images_background.zip").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    opener = _Opener(data)
    path = download("images_background", tmp_path, sha256=digest, opener=opener)
    assert path == tmp_path / "images_background.zip" and path.read_bytes() == data
    assert opener.urls == [om.ARCHIVES["images_background"].url]
    assert (tmp_path / "images_background.zip.sha256").read_text().startswith(digest)
    # cached: no second fetch, and the recorded hash is checked
    assert download("images_background", tmp_path, opener=opener) == path and len(opener.urls) == 1
    folder = download("images_background", tmp_path, extract=True, opener=opener)
    assert folder == tmp_path / "images_background" and (folder / "Greek" / "character01").is_dir()
    assert len(load_characters(folder, cache=False)) == BACKGROUND
    assert om.ARCHIVES["images_background"].url.startswith("https://")


def test_download_rejects_a_wrong_hash(omniglot_zips, tmp_path):
    data = (omniglot_zips / "images_background_small1.zip").read_bytes()
    # the known SHA-256 of the real small1 archive does not match the fixture's
    with pytest.raises(MamlabError, match="failed verification: SHA-256"):
        download("images_background_small1", tmp_path, opener=_Opener(data))
    with pytest.raises(MamlabError, match="failed verification: MD5"):  # only an MD5 is known
        download("images_evaluation", tmp_path, opener=_Opener(data))
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob("*.part"))


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


def test_download_edge_cases_are_one_line(omniglot_zips, tmp_path):
    data = (omniglot_zips / "images_background.zip").read_bytes()
    (tmp_path / "images_background.zip").write_bytes(data)
    (tmp_path / "images_background.zip.sha256").write_text("")  # an empty record
    with pytest.raises(MamlabError, match="an empty SHA-256 record") as e:
        download("images_background", tmp_path, opener=_Opener(data))
    assert "\n" not in str(e.value)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(MamlabError, match="cannot use .*a-file.* as the download folder"):
        download("images_background", tmp_path / "a-file", opener=_Opener(data))
