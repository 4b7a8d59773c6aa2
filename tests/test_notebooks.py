"""The notebooks run from top to bottom, on the untrained parts and, for the last cell, on the miniature chain's
trained APT (APT_MIN_RUN_DIR points the notebook at it, so the result does not depend on what runs/ holds)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, trained, monkeypatch):
    import nbformat  # from jupyter, in requirements.txt
    from nbclient import NotebookClient

    monkeypatch.setenv("APT_MIN_RUN_DIR", str(trained / "run"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells if c.cell_type == "code"]
    assert any("fbank windows: (1, 512, 128)" in p for p in printed)
    answers = printed[-1].splitlines()  # the last cell: three questions to the trained model, each answered
    assert len(answers) == 3 and all(" -> " in a for a in answers) and answers[0].startswith("Summarize the audio")
