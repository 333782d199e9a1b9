"""tutorial.ipynb executes top to bottom on CPU, its plots render, and the committed copy carries its outputs.

Run: .venv/bin/python -m pytest -q tests/test_notebook.py   (a few minutes: section 7 trains two small models)

The notebook runs in a fresh kernel with the working directory at the repository root, exactly as committed: section 7
precomputes, trains and evaluates from scratch in a temporary directory (only the converted default models under
$MRPO_CACHE are reused when present). Its own cells assert that the inline derivations agree with mrpo.py, so a
drift between the two fails here.
"""

import json
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"


def _images(nb):
    """(cell index, output) for every PNG output of a code cell."""
    return [(i, out) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def _plotting_cells(nb):
    """Indices of the code cells that draw a figure."""
    return [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and "plt.show()" in cell.source]


def _kernel_env(tmp_path):
    """A kernel spec named python3 that runs THIS interpreter (the venv's), found first via JUPYTER_PATH.

    The venv's own spec says "python", which resolves through PATH; when the tests run as .venv/bin/python
    without an activated venv, PATH may find a python without ipykernel. The spec lives in tmp_path only.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (mrpo tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(tmp_path / "jupyter")


def test_notebook_executes_and_plots(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("JUPYTER_PATH", _kernel_env(tmp_path) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # section 7 writes its run (caches, adapters: ~150 MB) to a temp dir
    # timeout is per cell. On an idle 2-core machine the slowest cell (two training runs) takes about 4 minutes;
    # when other jobs share the cores it can take four times as long, which is no reason to fail.
    client = NotebookClient(nb, kernel_name="python3", timeout=1800, startup_timeout=180,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, naming the cell and the traceback, if any cell fails

    errors = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert errors == [], f"cells {errors} produced errors"
    plotting = _plotting_cells(nb)
    assert plotting, "the notebook draws no figures"
    with_image = sorted({i for i, _ in _images(nb)})
    assert with_image == plotting, f"cells {sorted(set(plotting) - set(with_image))} drew no image/png output"
    for i, out in _images(nb):
        assert len(out["data"]["image/png"]) > 1000, f"cell {i}: the PNG output is suspiciously small"


def test_committed_notebook_has_outputs():
    """The committed file is meant to read well on a code host without running: every code cell has run."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    not_run = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.execution_count is None]
    assert code and not not_run, f"cells {not_run} of {NOTEBOOK.name} were saved without running; execute the " \
                                 f"notebook top to bottom (e.g. Jupyter's 'Restart and run all') and save it"
    assert len(_images(nb)) == len(_plotting_cells(nb)), f"{NOTEBOOK.name} was saved without its plots"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{NOTEBOOK.name} was not saved from one top-to-bottom run " \
                                                    f"(execution counts {counts})"
