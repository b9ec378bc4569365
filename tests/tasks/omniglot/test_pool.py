import zipfile

import pytest
import torch

from mamlab.errors import MamlabError
from mamlab.tasks.omniglot.pool import load_characters

# the fixture's layout (conftest.py): drawings per character and characters per archive
D = 4
BACKGROUND, EVALUATION = 8, 5


def test_zip_and_folder_read_the_same(omniglot_zips, omniglot_folders, tmp_path):
    a = load_characters(omniglot_zips / "images_background.zip", cache=False)
    b = load_characters(omniglot_folders / "images_background", cache_dir=tmp_path)
    assert a.images.shape == (BACKGROUND, D, 28, 28) and a.images.dtype == torch.float32
    assert a.names == b.names and list(a.names) == sorted(a.names)
    assert a.names[0] == "Greek/character01" and a.group_names == ("Greek", "Korean", "Latin")
    torch.testing.assert_close(a.images, b.images)
    # strokes 1 on background 0, antialiased in between
    assert a.images.min() == 0 and a.images.max() == 1 and a.images.mean() < 0.3
    assert ((a.images > 0) & (a.images < 1)).any()


def test_image_size(omniglot_zips):
    p = load_characters(omniglot_zips / "images_evaluation.zip", image_size=14, cache=False)
    assert p.images.shape == (EVALUATION, D, 14, 14)


def test_unequal_drawings_keep_the_smallest_count(tmp_path, omniglot_helpers):
    png = omniglot_helpers.stroke_png
    files = {f"x/A/character01/{d}.png": png(d) for d in range(3)}
    files.update({f"x/A/character02/{d}.png": png(10 + d) for d in range(2)})
    with pytest.warns(UserWarning, match="keeping the first 2"):
        p = load_characters(omniglot_helpers.write_zip(tmp_path / "x.zip", files), cache=False)
    assert p.images.shape[:2] == (2, 2)


@pytest.mark.parametrize("kind", ["missing", "not_zip", "not_omniglot", "bad_png"])
def test_bad_sources(tmp_path, kind):
    path = tmp_path / "images_background.zip"
    if kind == "not_zip":
        path.write_bytes(b"this is not a zip")
    elif kind == "not_omniglot":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hello")
            zf.writestr("pictures/cat.png", b"")
    elif kind == "bad_png":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("images_background/A/character01/1.png", b"garbage")
    match = {"missing": "does not exist", "not_zip": "not a readable zip",
             "not_omniglot": "not an Omniglot archive", "bad_png": "cannot decode"}[kind]
    with pytest.raises(MamlabError, match=match) as err:
        load_characters(path, cache=False)
    assert "\n" not in str(err.value) and "images_background" in str(err.value)
