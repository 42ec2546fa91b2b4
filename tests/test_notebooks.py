"""The notebooks are documentation that must not rot: execute each at small size."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("IBFLOW_NB_SMALL", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(o.get("output_type") == "error" for o in cell.get("outputs", []))


README = pathlib.Path(__file__).parent.parent / "README.md"


def _readme_python_blocks():
    text, blocks = README.read_text(), []
    while "```python\n" in text:
        text = text.split("```python\n", 1)[1]
        block, text = text.split("```", 1)
        blocks.append(block)
    return blocks


@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_python_examples_run(index):
    """The README's Python examples, run as written but at a small size (the problem sizes and a
    placeholder data line are substituted; a substitution that no longer matches fails here)."""
    import numpy as np

    code = _readme_python_blocks()[index]
    namespace = {"np": np, "__name__": "readme"}
    exec("import jax\nimport ibflow as ib", namespace)
    if "X, y = ..." in code:  # a classification snippet on the reader's own separable data
        rng = np.random.default_rng(0)
        X = rng.standard_normal((12, 6))
        namespace.update(X=X, y=np.sign(X @ rng.standard_normal(6)))
        code = code.replace("X, y = ...", "pass")
    if "num_samples=100, dim=1000" in code:
        code = code.replace("num_samples=100, dim=1000", "num_samples=12, dim=40")
        code = code.replace("dim=1000", "dim=40")
        assert "1000" not in code
    exec(compile(code, f"README block {index}", "exec"), namespace)
