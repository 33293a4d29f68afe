"""docs/walkthrough.ipynb runs top to bottom (nbclient, a real Jupyter kernel), with tiny settings."""
from __future__ import annotations


import pytest

from conftest import REPO

nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (it is in .[test])")
nbformat = pytest.importorskip("nbformat")


@pytest.mark.slow
def test_walkthrough_notebook_executes(tmp_path, tiny_shards, tiny_classifier, monkeypatch):
    for k, v in {"WALKTHROUGH_SHARDS": tiny_shards, "WALKTHROUGH_STEPS": 4, "WALKTHROUGH_RUN": tmp_path / "run",
                 "WALKTHROUGH_CLASSIFIER": tiny_classifier, "OMP_NUM_THREADS": 1}.items():
        monkeypatch.setenv(k, str(v))  # the kernel inherits this environment
    nb = nbformat.read(REPO / "docs" / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 3  # sample grid, curves, interpolation
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "image shape" in text and "precision:" in text and "'cls_acc'" in text
    assert (tmp_path / "run" / "samples" / "step-00000004.png").is_file()
