"""notebooks/score_in_colab.ipynb runs top to bottom (nbclient, the python3 kernel, CPU) on a tiny
random PRM export, and its outputs hold the score table, the best-of-N table and the plot."""
import os

import pytest

from tests.serve.helpers import REPO
from tests.test_load_errors import export  # noqa: F401 - the tiny random PRM export (a fixture)

NOTEBOOK = os.path.join(REPO, "notebooks", "score_in_colab.ipynb")


@pytest.mark.slow
def test_notebook_executes_and_shows_a_score_table_and_a_plot(export, tmp_path, monkeypatch):  # noqa: F811
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("JAXPRM_PRM_DIR", export[0])  # instead of training the tiny run (covered elsewhere)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell):
        return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    out = "\n".join(text(c) for c in code)
    assert "cpu" in out and "dtype=float32, attention=xla" in out
    score_table = next(text(c) for c in code if "P(+)" in text(c) and "gold" in text(c))
    lines = score_table.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split()[:3] == ["step", "P(+)", "gold"])
    rows = [l for l in lines[header + 2:] if l.strip() and l.split()[0].isdigit()]
    assert len(rows) >= 2 and all(0.0 <= float(l.split()[1]) <= 1.0 for l in rows)
    assert "<- chosen" in out and "best-of-8 (min) answer" in out
    images = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "display_data"
              and "image/png" in o.get("data", {})]
    assert len(images) == 1 and len(images[0]["data"]["image/png"]) > 1000
