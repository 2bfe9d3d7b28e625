"""The explorer in a real browser: JupyterLab on localhost runs nbs/19_explore.ipynb (small settings:
LAGM_NB_QUICK=1) in headless Chromium; the training dashboard of its face annotator must show a picture, and moving
the seed slider and a class toggle must change the explorer's picture. With LAGM_NB_SCREENSHOT=1 the notebook runs
at its own size (as a reader runs it, still seconds) and screenshots of the explorer and the dashboard go to
figures/explorer.png and figures/dashboard.png. Skipped, with a message, without
Playwright or Chromium; failed instead with LAGM_NB_REQUIRE_BROWSER=1 (set by .ci/run)."""
import json, os, secrets, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "nbs/19_explore.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
# the pictures in the README: written only when asked (LAGM_NB_SCREENSHOT=1), so that a test run leaves the checkout
# as it was
TAKE_SCREENSHOTS = os.environ.get("LAGM_NB_SCREENSHOT") == "1"
SCREENSHOT = ROOT / "figures" / "explorer.png"
DASHBOARD_SCREENSHOT = ROOT / "figures" / "dashboard.png"
# the notebook's cell that trains the face annotator with a TrainingDashboard watching (found by its source)
DASHBOARD_CELL = "callbacks=[dashboard]"
# JupyterLab settings for the test: no autosave (the run must not write outputs into the committed notebook) and
# every cell in the page (no windowing), so that all of them can be checked; no news pop-up over the screenshot
SETTINGS = {"@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
            "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            pytest.fail(f"jupyter-lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.5)
    pytest.fail(f"jupyter-lab did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def jupyterlab(tmp_path):
    "A JupyterLab server on a free port with a token, the repository as its root; always shut down afterwards."
    lab = Path(sys.executable).parent / "jupyter-lab"   # the environment's own, which finds its own python3 kernel
    for name, value in SETTINGS.items():
        (tmp_path / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "settings" / name).write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "LAGM_NB_QUICK": "0" if TAKE_SCREENSHOTS else "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    log = tmp_path / "jupyterlab.log"
    cmd = [str(lab), "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
           f"--FileCheckpoints.root_dir={tmp_path / 'checkpoints'}",   # not nbs/.ipynb_checkpoints in the checkout
           "--LabApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"] + ["--allow-root"] * (os.geteuid() == 0)
    notebook_before = (ROOT / NOTEBOOK).read_bytes()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log)
        yield f"http://127.0.0.1:{port}", token, log
    finally:
        for sig, wait in [(signal.SIGTERM, 10), (signal.SIGKILL, 5)]:   # the server and its kernels: one group
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: break
            try: proc.wait(wait); break
            except subprocess.TimeoutExpired: continue
        if (ROOT / NOTEBOOK).read_bytes() != notebook_before: (ROOT / NOTEBOOK).write_bytes(notebook_before)


RUN_STATE = """() => {   // null while cells are queued or running, else the error outputs (names) of the run
  const nb = window.jupyterapp.shell.currentWidget;
  const session = nb && nb.content && nb.sessionContext.session;
  if (!session || !session.kernel || session.kernel.status !== 'idle') return null;
  const cells = [...Array(nb.content.model.cells.length).keys()].map(i => nb.content.model.cells.get(i));
  const code = cells.filter(c => c.type === 'code');
  if (!code.every(c => c.executionCount)) return null;
  const outputs = code.flatMap(c => c.outputs.toJSON());
  return outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue);
}"""


CELL_OUTPUTS = """(marker) => {   // [index, outputs] of the first cell whose source contains `marker`
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i).toJSON();
    const source = Array.isArray(cell.source) ? cell.source.join('') : cell.source;
    if (source.includes(marker)) return [i, cell.outputs || []];
  }
  return null;
}"""


def _dashboard_picture(page) -> bytes:
    "A screenshot of the training dashboard's picture, checked in the notebook's model and on the page."
    found = page.evaluate(CELL_OUTPUTS, DASHBOARD_CELL)
    assert found, f"no cell of {NOTEBOOK} contains {DASHBOARD_CELL!r}"
    index, outputs = found
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, f"the dashboard's cell has {len(pngs)} pictures, not one updated in place: {outputs}"
    assert len(pngs[0]) > 1000, "the dashboard's picture is empty"
    image = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output img")
    assert image.count() == 1, "the dashboard's picture is not on the page"
    image.scroll_into_view_if_needed()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=image.element_handle())
    assert image.bounding_box()["width"] > 100 and image.bounding_box()["height"] > 100
    picture = image.screenshot()
    assert picture.startswith(b"\x89PNG")
    return picture


def _new_src(page, image, src_before: str, what: str) -> str:
    "The image's new src once `what` has changed it (the widget gives every new picture a new blob URL)."
    try: page.wait_for_function("([el, old]) => el.src && el.src !== old", arg=[image.element_handle(), src_before],
                                timeout=30_000)
    except Exception as e: raise AssertionError(f"the picture did not change after the {what}") from e
    return image.get_attribute("src")


def _missing(why: str):
    "Skip the test, saying why; fail it instead where the browser is required (.ci/run: LAGM_NB_REQUIRE_BROWSER=1)."
    if os.environ.get("LAGM_NB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why}; LAGM_NB_REQUIRE_BROWSER=1 requires the browser test to run", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def sync_api():
    "Playwright's sync API, and Debian's Chromium for it to drive; without either, see `_missing`."
    try: from playwright import sync_api as api
    except ImportError: _missing("playwright is not installed: pip install playwright")
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) for the browser test")
    return api


def test_explorer_in_a_browser(sync_api, jupyterlab):
    url, token, log = jupyterlab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}&reset")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=60_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            try: errors = page.wait_for_function(RUN_STATE, timeout=150_000, polling=500).json_value()
            except Exception as e:
                raise AssertionError(f"the notebook did not finish in JupyterLab; server log:\n"
                                     f"{log.read_text()[-3000:]}") from e
            assert errors == [], f"the notebook failed in JupyterLab: {errors}"
            dashboard = _dashboard_picture(page)
            explorer = page.locator(".lagm-explorer").last     # the faces explorer (the first is the tiny check's)
            explorer.scroll_into_view_if_needed()
            image = explorer.locator(".lagm-explorer-image")
            page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=image.element_handle())
            src, shot = image.get_attribute("src"), image.screenshot()
            handle = explorer.locator(".lagm-explorer-seed .noUi-handle")
            handle.focus(); handle.press("ArrowRight")            # the seed slider, one step
            src = _new_src(page, image, src, "seed slider")
            assert explorer.locator(".lagm-explorer-seed_box input").input_value() == "1"
            moved = image.screenshot()
            explorer.locator(".lagm-explorer-class-1 input[type=checkbox]").click()   # hide the skin
            _new_src(page, image, src, "class toggle")
            hidden = image.screenshot()
            assert len({shot, moved, hidden}) == 3, "the picture did not change"
            assert "seeds 1-8" in explorer.locator(".lagm-explorer-status").inner_text()
            picture = explorer.screenshot()
            assert picture.startswith(b"\x89PNG")
            if TAKE_SCREENSHOTS: SCREENSHOT.write_bytes(picture); DASHBOARD_SCREENSHOT.write_bytes(dashboard)
        finally:
            browser.close()
