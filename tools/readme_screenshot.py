"""The README's picture of notebook 04 in JupyterLab, taken on a committed record (not a smoke run).

    python tools/readme_screenshot.py [--run results/cifar10_lt_ir100_cpu] [--out results/screenshots/jupyterlab_04.png]

Copies the record into a temporary results folder (notebook 04 writes its figures into the run
folder; the committed one is left untouched), serves a copy of notebook 04 whose ``run_name`` is
the record's, runs it from JupyterLab's Run > Run All Cells in headless Chromium with the browser
test's machinery (tests/browser/test_jupyterlab.py: same server flags, settings and checks), and
saves the method explorer cell, with the sentence above it, as the README's PNG. Needs
``pip install -e ".[browser]"`` and Chromium; a few minutes on a 2-core CPU (notebook 04's t-SNE).
Rerun it whenever the record is rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "browser"))

import test_jupyterlab as lab  # noqa: E402  (the browser test's helpers: one way to drive JupyterLab)

NOTEBOOK = "04_per_split_analysis.ipynb"


def served_notebook(folder: Path, run_name: str) -> Path:
    """A copy of notebook 04 whose parameters cell names ``run_name`` (a literal, as a user would edit it)."""
    nb = json.loads((ROOT / "notebooks" / NOTEBOOK).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"])
    cell["source"] = source.replace('run_name = "default"', f'run_name = "{run_name}"', 1).splitlines(keepends=True)
    assert run_name in "".join(cell["source"]), "notebook 04's parameters cell no longer starts with run_name"
    path = folder / NOTEBOOK
    path.write_text(json.dumps(nb, indent=1))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="results/cifar10_lt_ir100_cpu", help="the committed run folder to show")
    parser.add_argument("--out", default="results/screenshots/jupyterlab_04.png", help="the PNG to write")
    args = parser.parse_args(argv)
    run = (ROOT / args.run).resolve()
    chromium = lab._chromium()
    if chromium is None:
        sys.exit("Chromium not found: install it (apt-get install chromium) and pip install -e '.[browser]'")
    with tempfile.TemporaryDirectory(prefix="cbd-screenshot-") as temp:
        base = Path(temp)
        shutil.copytree(run, base / "results" / run.name, ignore=shutil.ignore_patterns("*.pt", ".lock"))
        served = base / "notebooks"
        served.mkdir()
        served_notebook(served, run.name)
        settings = base / "lab-settings"
        for relative, values in lab.LAB_SETTINGS.items():
            (settings / relative).parent.mkdir(parents=True, exist_ok=True)
            (settings / relative).write_text(json.dumps(values))
        env = {key: value for key, value in os.environ.items() if key not in ("MPLBACKEND", "CBD_SMOKE")}
        env.update({"CBD_RESULTS_DIR": str(base / "results"), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
                    "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
                    "IPYTHONDIR": str(base / "ipython")})
        port, token = lab._free_port(), secrets.token_hex(24)
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                   f"--ServerApp.root_dir={served}", "--LabApp.expose_app_in_browser=True"]
        if os.geteuid() == 0:
            command.append("--allow-root")
        with open(base / "jupyterlab.log", "wb") as log:
            process = subprocess.Popen(command, env=env, cwd=served, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        server = lab.LabServer(process, port, token, base / "jupyterlab.log")
        try:
            lab._wait_until_up(server)
            from playwright.sync_api import sync_playwright

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=lab.CHROMIUM_ARGS)
                page = lab._open_notebook(browser, server, NOTEBOOK)
                state = lab._run_all_cells(page)
                lab._check_ran_cleanly(NOTEBOOK, state)  # not _check_figures: a record made before the
                # analyses has none to draw (their cells then skip), which is no error here
                # The whole notebook in one tall viewport (as the browser test's full-page shots), so the
                # cell is laid out unscrolled and its box is where the clip takes it.
                height = lab._panel(page).locator(".jp-WindowedPanel-outer").evaluate("(o) => o.scrollHeight")
                page.set_viewport_size({"width": lab.VIEWPORT["width"],
                                        "height": min(lab.MAX_SCREENSHOT_HEIGHT, int(height) + 150)})
                page.wait_for_timeout(1500)
                cell = lab._code_cell(page, "method_explorer(")
                above = cell.locator("xpath=preceding-sibling::div[1]")  # the markdown that introduces it
                top = above.bounding_box() or cell.bounding_box()
                box = cell.bounding_box()
                out = ROOT / args.out
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), clip={"x": box["x"] - 70, "y": top["y"], "width": box["width"] + 80,
                                                     "height": box["y"] + box["height"] - top["y"]})
                browser.close()
        finally:
            lab._stop(process)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
