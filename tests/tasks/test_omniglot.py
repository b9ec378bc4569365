import hashlib
import io
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch

from mamlab.errors import MamlabError
from mamlab.tasks import omniglot as om
from mamlab.tasks.base import TaskBatch, TaskFamily
from mamlab.tasks.omniglot import (
    CharacterPool,
    Omniglot,
    OmniglotTasks,
    affine_warp,
    download,
    load_characters,
    random_affine,
    safe_extract,
)

# the fixture's layout (conftest.py): drawings per character and characters per archive
D = 4
BACKGROUND, EVALUATION, MINIMAL = 8, 5, 9  # minimal: Greek 2 + Latin 2 counted once + Balinese 3 + Tagalog 2


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pool(omniglot_zips, tmp_path_factory):
    return load_characters(omniglot_zips / "images_background.zip",
                           cache_dir=tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------------------------------------- reading


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


def test_cache_is_reused_and_keyed_by_source(omniglot_zips, tmp_path, monkeypatch):
    src = tmp_path / "images_evaluation.zip"
    src.write_bytes((omniglot_zips / "images_evaluation.zip").read_bytes())
    cache = tmp_path / "cache"
    first = load_characters(src, cache_dir=cache)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1

    from safetensors import safe_open
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.get_tensor("images").dtype == torch.uint8
        assert f.get_tensor("images").shape == (EVALUATION * D, 28, 28)
        assert f.get_tensor("labels").tolist() == [c for c in range(EVALUATION) for _ in range(D)]
        assert "Kannada/character01" in f.metadata()["names"]

    def boom(*a, **k):
        raise AssertionError("decoded a PNG although the cache was warm")

    monkeypatch.setattr(om, "decode_png", boom)
    second = load_characters(src, cache_dir=cache)
    torch.testing.assert_close(first.images, second.images)
    assert first.names == second.names
    # another image size or a changed source is a new cache entry
    monkeypatch.undo()
    load_characters(src, image_size=20, cache_dir=cache)
    src.write_bytes(src.read_bytes())  # new mtime
    import os
    os.utime(src, ns=(1, 1))
    load_characters(src, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 3


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


# ---------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("layout", ["zips", "folders"])
def test_minimal_split(layout, omniglot_zips, omniglot_folders, tmp_path):
    root = omniglot_zips if layout == "zips" else omniglot_folders
    o = Omniglot(root, "minimal", ways=5, cache_dir=tmp_path)
    train, test = o.pools["train"], o.pools["test"]
    assert len(train) == MINIMAL and len(set(train.names)) == MINIMAL
    assert test.images.shape == (3 * 20, 2, 28, 28) and test.group_names == ("run01", "run02", "run03")
    assert o.pools["validation"] is None
    batch = o.tasks("test", ways=20).sample(4, 1, 1, gen())
    assert batch.support_x.shape == (4, 20, 1, 28, 28)
    # a test task's classes are the 20 classes of one run
    runs = test.groups
    for t in range(4):
        classes = [_class_of(test, x) for x in batch.support_x[t, :, 0]]
        assert len(set(classes)) == 20 and len({int(runs[c]) for c in classes}) == 1


def test_background_split(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "background", cache_dir=tmp_path)
    assert len(o.pools["train"]) == BACKGROUND and len(o.pools["test"]) == EVALUATION
    assert not set(o.pools["train"].names) & set(o.pools["test"].names)
    assert not o.tasks("test").rotation_classes


def test_vinyals_split(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "vinyals", num_train=10, cache_dir=tmp_path)
    train, test = o.pools["train"], o.pools["test"]
    assert len(train) == 10 and len(test) == BACKGROUND + EVALUATION - 10
    assert not set(train.names) & set(test.names)
    assert o.tasks("train").num_classes == 40 and o.tasks("test").num_classes == 12  # rotations as classes
    again = Omniglot(omniglot_zips, "vinyals", num_train=10, cache_dir=tmp_path)
    assert again.pools["train"].names == train.names
    other = Omniglot(omniglot_zips, "vinyals", num_train=10, seed=1, cache_dir=tmp_path)
    assert other.pools["train"].names != train.names
    with pytest.raises(MamlabError, match="num_train=13 leaves no meta-test"):
        Omniglot(omniglot_zips, "vinyals", num_train=13, cache_dir=tmp_path)


def test_validation_split(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "background", validation_fraction=0.25, seed=3, cache_dir=tmp_path)
    train, val = o.pools["train"], o.pools["validation"]
    assert len(val) == 2 and len(train) == BACKGROUND - 2
    assert not set(train.names) & set(val.names)
    again = Omniglot(omniglot_zips, "background", validation_fraction=0.25, seed=3, cache_dir=tmp_path)
    assert again.pools["validation"].names == val.names
    assert o.tasks("validation", ways=2).sample(3, 1, 1, gen()).support_x.shape == (3, 2, 1, 28, 28)
    with pytest.raises(MamlabError, match="no validation characters"):
        Omniglot(omniglot_zips, "background", cache_dir=tmp_path).tasks("validation")


def test_split_errors(omniglot_zips, tmp_path):
    with pytest.raises(MamlabError, match="unknown split 'omni'"):
        Omniglot(omniglot_zips, "omni")
    with pytest.raises(MamlabError, match="is not a folder"):
        Omniglot(tmp_path / "nowhere")
    (tmp_path / "images_background.zip").write_bytes((omniglot_zips / "images_background.zip").read_bytes())
    with pytest.raises(MamlabError, match="split 'background' needs images_evaluation ") as err:
        Omniglot(tmp_path, "background", cache_dir=tmp_path / "cache")
    assert str(tmp_path) in str(err.value)
    with pytest.raises(MamlabError, match="validation_fraction must be in"):
        Omniglot(omniglot_zips, validation_fraction=1.0)


# ---------------------------------------------------------------------------------------------- sampler


def _locate(pool: CharacterPool, image: torch.Tensor, rotations=(0,)) -> tuple[int, int]:
    """(class, drawing) of ``image`` in the pool, trying each rotation; asserts it is found once."""
    hits = []
    for r in rotations:
        rotated = torch.rot90(pool.images, r, dims=(-2, -1))
        eq = (rotated == image).flatten(2).all(-1).nonzero().tolist()
        hits += [(c + r * len(pool), d) for c, d in eq]
    assert len(hits) == 1, hits
    return tuple(hits[0])


def _class_of(pool: CharacterPool, image: torch.Tensor) -> int:
    """The one class holding ``image`` (the fixture's runs repeat a drawing within a class)."""
    classes = {c for c, _ in (pool.images == image).flatten(2).all(-1).nonzero().tolist()}
    assert len(classes) == 1, classes
    return classes.pop()


def test_sample_shapes_labels_and_protocol(pool):
    tasks = OmniglotTasks(pool, ways=3)
    assert isinstance(tasks, TaskFamily) and tasks.kind == "classification"
    b = tasks.sample(6, shots=2, queries=2, generator=gen())
    assert isinstance(b, TaskBatch)
    assert b.support_x.shape == (6, 6, 1, 28, 28) and b.query_x.shape == (6, 6, 1, 28, 28)
    assert b.support_y.dtype == torch.int64 and b.query_y.dtype == torch.int64
    assert b.support_x.dtype == torch.float32
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2] and b.query_y[0].tolist() == [0, 0, 1, 1, 2, 2]


def test_sample_is_a_valid_episode(pool):
    b = OmniglotTasks(pool, ways=4).sample(10, shots=1, queries=3, generator=gen(1))
    for t in range(10):
        support = [_locate(pool, x[0]) for x in b.support_x[t]]
        query = [_locate(pool, x[0]) for x in b.query_x[t]]
        classes = [c for c, _ in support]
        assert len(set(classes)) == 4  # N distinct classes
        for (c, _), y in zip(query, b.query_y[t].tolist(), strict=True):
            assert c == classes[y]  # query label j is support class j
        assert len(set(support + query)) == 4 * 4  # distinct drawings


def test_sample_is_seeded_and_varies(pool):
    tasks = OmniglotTasks(pool, ways=5)
    a, b = tasks.sample(4, 1, 3, gen(7)), tasks.sample(4, 1, 3, gen(7))
    torch.testing.assert_close(a.query_x, b.query_x)
    c = tasks.sample(4, 1, 3, gen(8))
    assert not torch.equal(a.query_x, c.query_x)
    # every class gets drawn over many tasks
    many = tasks.sample(200, 1, 1, gen(9))
    seen = {_locate(pool, x[0])[0] for x in many.support_x[:40].flatten(0, 1)}
    assert seen == set(range(len(pool)))


def test_within_groups(pool):
    b = OmniglotTasks(pool, ways=3, within_groups=True).sample(20, 1, 1, gen())
    for t in range(20):
        groups = {int(pool.groups[_locate(pool, x[0])[0]]) for x in b.support_x[t]}
        assert len(groups) == 1
    # Korean has only 2 characters: 3-way tasks come from Greek or Latin only
    with pytest.raises(MamlabError, match="ways=4 exceeds the largest group of the pool \\(3 classes\\)"):
        OmniglotTasks(pool, ways=4, within_groups=True)


@pytest.mark.parametrize("mode", ["rotation_classes", "rotate"])
def test_rotations(pool, mode):
    tasks = OmniglotTasks(pool, ways=5, **{mode: True})
    if mode == "rotation_classes":
        assert tasks.num_classes == 4 * len(pool)
    b = tasks.sample(8, 1, 2, gen(2))
    rotated = 0
    for t in range(8):
        support = [_locate(pool, x[0], rotations=(0, 1, 2, 3)) for x in b.support_x[t]]
        query = [_locate(pool, x[0], rotations=(0, 1, 2, 3)) for x in b.query_x[t]]
        classes = [c for c, _ in support]
        for (c, _), y in zip(query, b.query_y[t].tolist(), strict=True):
            assert c == classes[y]  # a class keeps one rotation across its support and query
        rotated += sum(c >= len(pool) for c in classes)
    assert rotated > 0


def test_sampler_errors(pool):
    with pytest.raises(MamlabError, match="ways=9 exceeds the 8 classes available"):
        OmniglotTasks(pool, ways=9)
    tasks = OmniglotTasks(pool, ways=2)
    with pytest.raises(MamlabError, match="shots \\+ queries = 5 exceeds the 4 drawings per class"):
        tasks.sample(2, 1, 4)
    with pytest.raises(MamlabError, match="shots must be"):
        tasks.sample(2, 0, 1)
    assert OmniglotTasks(pool, ways=9, rotation_classes=True).sample(1, 1, 1, gen()).num_tasks == 1


def test_omniglot_samples_meta_training_tasks(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "background", ways=4, rotate=True, cache_dir=tmp_path)
    assert isinstance(o, TaskFamily) and o.kind == "classification" and o.ways == 4
    b = o.sample(3, 1, 2, gen())
    assert b.support_x.shape == (3, 4, 1, 28, 28) and b.query_y.shape == (3, 8)
    assert o.tasks("train").rotate and not o.tasks("test").rotate


# ---------------------------------------------------------------------------------------------- augmentation


def test_affine_warp_matches_exact_pixel_operations():
    x = torch.rand(3, 1, 28, 28, generator=gen())
    none, ones = torch.zeros(3, 2), torch.ones(3, 2)
    zero = torch.zeros(3)
    assert torch.allclose(affine_warp(x, zero, none, ones, none), x, atol=1e-5)
    right = torch.zeros_like(x)
    right[..., 2:] = x[..., :-2]  # 2 pixels right, zeros come in
    assert torch.allclose(affine_warp(x, zero, none, ones, torch.tensor([[2.0, 0.0]] * 3)), right, atol=1e-5)
    up = torch.zeros_like(x)
    up[..., :-3, :] = x[..., 3:, :]
    assert torch.allclose(affine_warp(x, zero, none, ones, torch.tensor([[0.0, -3.0]] * 3)), up, atol=1e-5)
    quarter = affine_warp(x, torch.full((3,), torch.pi / 2), none, ones, none)
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)  # counter-clockwise
    mirrored = affine_warp(x, zero, none, torch.tensor([[-1.0, 1.0]] * 3), none)
    assert torch.allclose(mirrored, torch.flip(x, dims=(-1,)), atol=1e-5)


def test_random_affine_is_seeded_per_image_and_in_range():
    x = torch.zeros(64, 1, 28, 28)
    x[..., 10:18, 10:18] = 1.0  # a centred square
    a, b = random_affine(x, gen(1)), random_affine(x, gen(1))
    assert torch.equal(a, b) and not torch.equal(a, random_affine(x, gen(2)))
    assert len({tuple(img.flatten().tolist()) for img in a}) == 64  # each image its own map
    ink = a.sum((1, 2, 3)) / x[0].sum()  # area changes by |det| = scale_x*scale_y*(1 - shear_x*shear_y)
    assert bool((ink > 0.8 * 0.8 * (1 - 0.09) - 0.05).all()) and bool((ink < 1.2 * 1.2 + 0.05).all())
    # the centre of mass moves by at most the shift plus what the linear part does to an off-centre grid
    ys = torch.arange(28.0).view(1, 28, 1)
    centre = (a[:, 0] * ys).sum((1, 2)) / a[:, 0].sum((1, 2))
    assert bool(((centre - 13.5).abs() < 2.6).all())


def test_affine_augments_training_tasks_only(omniglot_zips, tmp_path):
    plain = Omniglot(omniglot_zips, "background", ways=4, cache_dir=tmp_path)
    warped = Omniglot(omniglot_zips, "background", ways=4, affine=True, cache_dir=tmp_path)
    assert warped.tasks("train").affine and not warped.tasks("test").affine
    a, b = plain.sample(3, 1, 2, gen()), warped.sample(3, 1, 2, gen())
    assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
    assert not torch.allclose(a.support_x, b.support_x)
    # the same drawings, distorted: each augmented image is closest to its own source image
    source, image = a.query_x.flatten(0, 1).flatten(1), b.query_x.flatten(0, 1).flatten(1)
    similarity = torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(source, dim=1).T
    off = (similarity.sum() - similarity.diagonal().sum()) / (len(similarity) ** 2 - len(similarity))
    assert float(similarity.diagonal().mean()) > 0.5 and float(similarity.diagonal().mean()) > float(off) + 0.2


# ---------------------------------------------------------------------------------------------- download


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


def test_omniglot_download_flag(omniglot_zips, tmp_path, monkeypatch):
    fetched = []

    def fake(name, cache_dir):
        fetched.append(name)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)  # as download() does
        target = Path(cache_dir) / f"{name}.zip"
        target.write_bytes((omniglot_zips / f"{name}.zip").read_bytes())
        return target

    monkeypatch.setattr(om, "_download_archive", fake)
    o = Omniglot(tmp_path / "data", "background", download=True, cache_dir=tmp_path / "cache")
    assert fetched == ["images_background", "images_evaluation"] and len(o.pools["test"]) == EVALUATION


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


# ---------------------------------------------------------------------------------------------- real data


def test_real_minimal_split_has_242_characters(real_omniglot, tmp_path):
    o = Omniglot(real_omniglot, "minimal", ways=20, cache_dir=tmp_path)
    assert len(o.pools["train"]) == 242 and o.pools["train"].num_drawings == 20
    assert o.pools["test"].images.shape == (400, 2, 28, 28)
    assert o.tasks("test").sample(2, 1, 1, gen()).support_x.shape == (2, 20, 1, 28, 28)
