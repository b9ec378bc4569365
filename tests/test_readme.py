"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int) -> None:
    namespace: dict = {}
    if index > 0:  # later blocks build on the imports of the first
        exec(compile("import torch, torch.nn.functional as F\nimport mamlab\n", "README", "exec"), namespace)
    exec(compile(BLOCKS[index], f"README block {index}", "exec"), namespace)
