"""The workbook as users meet it: the four notebooks run from JupyterLab's UI in headless Chromium.

A real ``jupyter lab`` server (127.0.0.1, a random token, temporary config / settings /
workspace folders, ``CBD_SMOKE=1``, a temporary ``CBD_RESULTS_DIR``) serves copies of the
notebooks; Playwright drives Debian's Chromium through Run > Run All Cells for 01 -> 04 in
order (03 and 04 read what 02 trained), waits for the kernel to go idle and checks what a
person sees: no error output, the figures as images, and live widgets (01's imbalance slider
and 04's method picker redraw their figures). A full-page screenshot of each notebook goes to
the test's temporary folder and to ``$CBD_SCREENSHOTS`` when set.

Run it alone with ``CBD_SMOKE=1 python -m pytest -q -m browser tests/browser``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ["01_long_tail_statistics.ipynb", "02_teacher_training.ipynb",
             "03_class_balanced_distillation.ipynb", "04_per_split_analysis.ipynb"]
CHROMIUM_CANDIDATES = ["/usr/bin/chromium", "chromium", "chromium-browser"]
# Chromium flags for a headless container: no sandbox (root), no GPU, nothing online.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions", "--mute-audio"]
SERVER_START_S = 120
NOTEBOOK_RUN_S = 1800  # smoke notebooks take a minute or two; a busy 2-core machine is slower
WIDGET_REDRAW_S = 120
VIEWPORT = {"width": 1280, "height": 900}
MAX_SCREENSHOT_HEIGHT = 16000  # Chromium's limit for one capture

# User settings a person would plausibly have, chosen so the page is deterministic: every cell
# rendered (no windowing, so full-page screenshots show all), no news / update toasts, no
# autosave (the server serves copies anyway).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none", "scrollPastEnd": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


# --------------------------------------------------------------------------- fixtures


def _chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('Playwright is not installed: pip install -e ".[browser]"')
    return sync_playwright


@pytest.fixture(scope="module")
def chromium_path():
    path = _chromium()
    if path is None:
        pytest.skip("Chromium is not installed: sudo apt-get install -y chromium")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabServer:
    """A running ``jupyter lab``: its URL, token and log."""

    def __init__(self, process: subprocess.Popen, port: int, token: str, log: Path):
        self.process, self.port, self.token, self.log = process, port, token, log
        self.base = f"http://127.0.0.1:{port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def shutdown_kernels(self) -> None:
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE")


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory, chromium_path, sync_playwright):
    """``jupyter lab`` on a free local port, serving copies of the notebooks; stopped at the end, pass or fail."""
    base = tmp_path_factory.mktemp("jupyterlab")
    served = base / "notebooks"
    served.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, served / name)
    settings_dir = base / "lab-settings"
    for relative, values in LAB_SETTINGS.items():
        (settings_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (settings_dir / relative).write_text(json.dumps(values))

    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # as a user's server: the kernels' inline backend shows the figures
    env.update({
        "CBD_SMOKE": "1",
        "CBD_RESULTS_DIR": str(base / "results"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "JUPYTER_CONFIG_DIR": str(base / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(base / "jupyter-runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "lab-workspaces"),
        "IPYTHONDIR": str(base / "ipython"),
    })
    port, token = _free_port(), secrets.token_hex(24)
    log = base / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={served}", "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, env=env, cwd=served, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(process, port, token, log)
    try:
        _wait_until_up(server)
        yield server
    finally:
        _stop(process)


def _wait_until_up(server: LabServer) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"jupyter lab exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            server.api("status")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within {SERVER_START_S} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (server and kernels), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def browser(sync_playwright, chromium_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def screenshot_dirs(tmp_path):
    dirs = [tmp_path / "screenshots"]
    if os.environ.get("CBD_SCREENSHOTS"):
        dirs.append(Path(os.environ["CBD_SCREENSHOTS"]))
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
    return dirs


# --------------------------------------------------------------------------- page helpers

# The notebook's state as JupyterLab's model holds it (window.jupyterapp, exposed by the
# server flag above): kernel status and, per code cell, prompt, outputs and source.
_NOTEBOOK_STATE_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session ? panel.sessionContext.session.kernel : null;
  const cells = [];
  panel.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const outputs = cell.model.outputs.toJSON();
    cells.push({
      index: index,
      source: cell.model.sharedModel.getSource(),
      count: cell.model.executionCount,
      prompt: cell.promptNode ? cell.promptNode.textContent : '',
      errors: outputs.filter(o => o.output_type === 'error').map(o => `${o.ename}: ${o.evalue}`),
      tracebacks: outputs.filter(o => o.output_type === 'stream' && o.name === 'stderr'
                                      && String(o.text).includes('Traceback')).length,
      images: Array.from(cell.node.querySelectorAll('.jp-OutputArea-output img'))
                   .filter(img => img.complete && img.naturalWidth > 0).length,
      // Figures wider than the notebook: JupyterLab shrinks them (text too small to read).
      wide: Array.from(cell.node.querySelectorAll('.jp-OutputArea-output img'))
                 .map(img => [img.naturalWidth, img.closest('.jp-OutputArea').clientWidth])
                 .filter(([natural, room]) => natural > room),
    });
  });
  return {kernel: kernel ? kernel.status : 'none', cells: cells};
}"""


def _state(page) -> dict | None:
    return page.evaluate(_NOTEBOOK_STATE_JS)


def _wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _kernel_idle(page) -> bool:
    state = _state(page)
    return bool(state) and state["kernel"] == "idle"


def _run_all_cells(page) -> dict:
    """Run > Run All Cells from the menu bar; returns the state once the run has settled."""
    page.locator("#jp-MainMenu").get_by_role("menuitem", name="Run", exact=True).click()
    page.locator("#jp-mainmenu-run .lm-Menu-item").filter(
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))).click()
    # Queued cells show [*] until they ran; after an error the kernel aborts the rest (blank
    # prompts). Settled = kernel idle and no [*] for a few polls in a row.
    settled, last = 0, None
    deadline = time.monotonic() + NOTEBOOK_RUN_S
    while time.monotonic() < deadline and settled < 4:
        time.sleep(1.0)
        last = _state(page)
        busy = last is None or last["kernel"] != "idle" or any("*" in c["prompt"] for c in last["cells"])
        settled = 0 if busy else settled + 1
    if settled < 4:
        pytest.fail(f"the notebook was still running after {NOTEBOOK_RUN_S} s")
    return last


def _open_notebook(browser, server: LabServer, name: str):
    """A new page on the notebook, in a workspace of its own (nothing restored from the last one)."""
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(server.url(f"lab/workspaces/{Path(name).stem}/tree/{name}"))
    _wait_for(lambda: page.evaluate(_CURRENT_NOTEBOOK_JS) == name, 120, f"JupyterLab to show {name}")
    _wait_for(lambda: _kernel_idle(page), 180, f"{name}'s kernel to start")
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the notebook gets the width
    return page


_CURRENT_NOTEBOOK_JS = """() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  return panel && panel.context && panel.content && panel.content.widgets.length ? panel.context.localPath : null;
}"""


def _panel(page):
    """The current notebook panel (the page has only this one)."""
    return page.locator(".jp-NotebookPanel:visible")


def _screenshot(page, name: str, dirs: list[Path]) -> None:
    """A full-page PNG of the whole notebook: the viewport grows to the notebook's height."""
    height = _panel(page).locator(".jp-WindowedPanel-outer").evaluate("(outer) => outer.scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"],
                            "height": min(MAX_SCREENSHOT_HEIGHT, max(VIEWPORT["height"], int(height) + 150))})
    page.wait_for_timeout(500)
    for folder in dirs:
        page.screenshot(path=str(folder / (Path(name).stem + ".png")), full_page=True)
    page.set_viewport_size(VIEWPORT)


def _code_cell(page, source_snippet: str):
    cells = _panel(page).locator(".jp-CodeCell").filter(
        has=page.locator(".jp-InputArea", has_text=source_snippet))
    assert cells.count() == 1, f"expected one code cell containing {source_snippet!r}, found {cells.count()}"
    return cells.first


def _image_source(cell) -> str | None:
    images = cell.locator(".jp-OutputArea-output img")
    return images.first.get_attribute("src") if images.count() else None


def _wait_for_new_image(cell, before: str, what: str) -> None:
    _wait_for(lambda: (_image_source(cell) or before) != before, WIDGET_REDRAW_S, what)


# --------------------------------------------------------------------------- checks


def _check_ran_cleanly(name: str, state: dict) -> None:
    errors = [f"cell {c['index']}: {e}" for c in state["cells"] for e in c["errors"]]
    errors += [f"cell {c['index']}: a traceback on stderr" for c in state["cells"] if c["tracebacks"]]
    assert not errors, f"{name} shows errors: " + "; ".join(errors)
    not_run = [c["index"] for c in state["cells"] if c["count"] is None]
    assert not not_run, f"{name}: cells {not_run} did not run"


def _check_figures(name: str, state: dict) -> None:
    # Every cell that saves a figure (``path=figures / ...``) also shows it.
    figure_cells = [c for c in state["cells"] if "path=figures" in c["source"]]
    assert figure_cells, f"{name} has no figure cell"
    missing = [c["index"] for c in figure_cells if c["images"] < 1]
    assert not missing, f"{name}: cells {missing} save a figure but show no image"
    wide = [f"cell {c['index']}: {natural} px in {room} px" for c in state["cells"] for natural, room in c["wide"]]
    assert not wide, f"{name}: figures wider than the notebook: " + "; ".join(wide)


def _check_imbalance_widget(page) -> None:
    cell = _code_cell(page, "imbalance_explorer(")
    output = cell.locator(".jp-OutputArea-output")
    handle = output.locator(".widget-slider .noUi-handle").first
    handle.wait_for(state="visible", timeout=30_000)
    assert output.locator("select").count() == 1, "the profile menu is missing"
    assert "VBox(" not in output.first.inner_text(), "the widget rendered as text"
    readout = output.locator(".widget-readout").first
    ratio_before, image_before = readout.inner_text(), _image_source(cell)
    assert image_before, "the imbalance widget shows no figure"
    # Drag the handle left, towards ratio 1 (every ratio there keeps an image per class).
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 30, y, steps=6)
    page.mouse.up()
    _wait_for_new_image(cell, image_before, "the class histogram to redraw after moving the imbalance slider")
    assert readout.inner_text() != ratio_before, "the slider's readout did not change"


def _check_method_picker(page) -> None:
    cell = _code_cell(page, "method_explorer(")
    picker = cell.locator(".jp-OutputArea-output select[multiple]")
    picker.wait_for(state="visible", timeout=30_000)
    labels = [label.strip() for label in picker.locator("option").all_inner_texts()]
    chosen = picker.evaluate("(s) => Array.from(s.selectedOptions).map(o => o.textContent.trim())")
    assert len(labels) >= 2, f"the method picker offers {labels}"
    others = [label for label in labels if label not in chosen] or labels[:1]
    image_before = _image_source(cell)
    assert image_before, "the method explorer shows no figure"
    picker.select_option(label=others[:2])
    _wait_for_new_image(cell, image_before, "the explorer to redraw after picking other methods")


WIDGET_CHECKS = {"01_long_tail_statistics.ipynb": _check_imbalance_widget,
                 "04_per_split_analysis.ipynb": _check_method_picker}


def test_notebooks_run_in_jupyterlab(lab_server, browser, screenshot_dirs):
    """01 -> 04 in one run folder, each from Run > Run All Cells, as a person would."""
    for name in NOTEBOOKS:
        page = _open_notebook(browser, lab_server, name)
        try:
            state = _run_all_cells(page)
            _screenshot(page, name, screenshot_dirs)  # before the checks, so a failure has its picture
            _check_ran_cleanly(name, state)
            _check_figures(name, state)
            if name in WIDGET_CHECKS:
                WIDGET_CHECKS[name](page)
        finally:
            page.close()
            lab_server.shutdown_kernels()
