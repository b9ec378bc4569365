"""A tiny Omniglot in the official layout (random stroke PNGs), zipped and extracted, for the tests."""

from __future__ import annotations

import io
import os
import random
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

# archive -> {alphabet: characters}; small1 and small2 share Greek and Latin, as the real ones do
LAYOUT = {
    "images_background": {"Greek": 3, "Latin": 3, "Korean": 2},
    "images_evaluation": {"Atlantean": 2, "Kannada": 3},
    "images_background_small1": {"Greek": 2, "Latin": 2, "Balinese": 3},
    "images_background_small2": {"Greek": 2, "Latin": 2, "Tagalog": 2},
}
DRAWINGS = 4
RUNS, RUN_CLASSES = 3, 20


def stroke_png(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG of a few random black strokes on white, like an Omniglot drawing."""
    rng = random.Random(seed)
    im = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 4)):
        pts = [(rng.randint(10, size - 10), rng.randint(10, size - 10)) for _ in range(rng.randint(2, 4))]
        draw.line(pts, fill=0, width=rng.randint(2, 4))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def archive_files(name: str, drawings: int = DRAWINGS) -> dict[str, bytes]:
    """The files of one image archive: ``name/Alphabet/characterNN/XXXX_DD.png``."""
    files = {}
    for alphabet, chars in LAYOUT[name].items():
        for c in range(1, chars + 1):
            ident = zlib.crc32(f"{alphabet}/{c}".encode()) % 10_000
            for d in range(1, drawings + 1):
                # shared alphabets draw the same images in both small sets (seed ignores the archive)
                seed = zlib.crc32(f"{alphabet}/{c}/{d}".encode())
                files[f"{name}/{alphabet}/character{c:02d}/{ident:04d}_{d:02d}.png"] = stroke_png(seed)
    return files


def runs_files(runs: int = RUNS, classes: int = RUN_CLASSES, seed: int = 0) -> dict[str, bytes]:
    """The files of a small all_runs.zip: training images, test images (a near copy) and class_labels.txt."""
    rng = random.Random(seed)
    files = {}
    for r in range(1, runs + 1):
        run = f"run{r:02d}"
        order = list(range(1, classes + 1))
        rng.shuffle(order)
        lines = []
        for c in range(1, classes + 1):
            files[f"{run}/training/class{c:02d}.png"] = stroke_png(1000 * r + c)
        for i, c in enumerate(order, start=1):
            files[f"{run}/test/item{i:02d}.png"] = stroke_png(1000 * r + c)  # same drawing: 0% error
            lines.append(f"{run}/test/item{i:02d}.png {run}/training/class{c:02d}.png")
        files[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    return files


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture(scope="session")
def omniglot_zips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the four image archives and all_runs.zip."""
    root = tmp_path_factory.mktemp("omniglot_zips")
    for name in LAYOUT:
        write_zip(root / f"{name}.zip", archive_files(name))
    write_zip(root / "all_runs.zip", runs_files())
    return root


@pytest.fixture(scope="session")
def omniglot_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same content extracted: ``images_background/Greek/character01/...``, ``all_runs/run01/...``."""
    root = tmp_path_factory.mktemp("omniglot_folders")
    for name in LAYOUT:
        write_folder(root, archive_files(name))
    write_folder(root / "all_runs", runs_files())
    return root


@pytest.fixture(scope="session")
def omniglot_helpers() -> SimpleNamespace:
    """The builders above, for tests that make their own archives (test modules cannot import conftest)."""
    return SimpleNamespace(stroke_png=stroke_png, archive_files=archive_files, runs_files=runs_files,
                           write_zip=write_zip, write_folder=write_folder)


#: The real Omniglot archives: $MAMLAB_OMNIGLOT_DATA, else ../shared/data/omniglot beside the checkout.
REAL = Path(os.environ.get("MAMLAB_OMNIGLOT_DATA")
            or Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot")


@pytest.fixture(scope="session")
def real_omniglot() -> Path:
    """The real archives at ../shared/data/omniglot, or skip."""
    if not (REAL / "all_runs.zip").is_file():
        pytest.skip(f"real Omniglot data not at {REAL}")
    return REAL
