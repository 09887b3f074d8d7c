"""The Seg-Grad-CAM viewer of 05_explain driven in a real browser: JupyterLab with the project's kernel on the tiny
phantom workspace, headless Chromium through Playwright (the system's Chromium; nothing is downloaded). Moving the
slice slider and the structure selector must change the image the page shows.

Skipped, with the reason, where no Chromium can be had (Debian: ``apt-get install chromium``; ``.ci/run``
installs it). Select or leave out with ``-m browser`` / ``-m "not browser"``.
"""
import hashlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest

from cmr_utils.paths import NOTEBOOKS_DIR

NOTEBOOK = "05_explain"
KERNEL = "cmr-ssl"
# Besides Playwright's headless mode and fresh profile: in a closed network, Chromium's own background connections
# (updates, sync, QUIC) are refused, so none are made.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_S, KERNEL_S, RUN_ALL_S, REDRAW_S = 60, 120, 300, 60
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# decided before any fixture runs, so a skip costs nothing
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: the browser test needs one "
                       "(Debian: apt-get install chromium; .ci/run installs it)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the Python package playwright is not installed (run `make env`)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepared_notebook(folder: Path) -> Path:
    """A copy of notebooks/05_explain.py as .ipynb in ``folder``, with profile=tiny injected (Papermill)."""
    source, target = folder / f"{NOTEBOOK}.src.ipynb", folder / f"{NOTEBOOK}.ipynb"
    nbformat.write(jupytext.read(NOTEBOOKS_DIR / f"{NOTEBOOK}.py"), source)
    papermill.execute_notebook(str(source), str(target), parameters={"profile": "tiny", "data": ""},
                               prepare_only=True, kernel_name=KERNEL, language="python", progress_bar=False)
    source.unlink()
    return target


@pytest.fixture(scope="module")
def jupyterlab(tiny_evaluated, tmp_path_factory):
    """A JupyterLab server (token, free port, no browser) whose root holds the prepared notebook; the kernel sees
    the tiny workspace through CMR_OUTPUT_ROOT. Yields (base URL, token, notebook name); shut down at the end."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"the Jupyter kernel {KERNEL!r} is not installed: run `make env`")
    home = tmp_path_factory.mktemp("jupyterlab")
    root = home / "root"
    root.mkdir()
    notebook = prepared_notebook(root)
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel must use the inline backend
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.user_settings_dir={home / 'settings'}", f"--LabApp.workspaces_dir={home / 'workspaces'}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = home / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited ({server.returncode}) at start:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {START_S} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, token, notebook.name, log_path
    finally:
        try:  # shuts the kernels down too
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"),
                                   timeout=5)
            server.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture(scope="module")
def page():
    """A page of headless Chromium (the system's binary) driven by Playwright."""
    from playwright import sync_api

    with sync_api.sync_playwright() as driver:
        try:
            browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        except sync_api.Error as err:
            pytest.skip(f"Chromium at {CHROMIUM} does not start under Playwright: {str(err).splitlines()[0]}")
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def shown(image, differs_from=None, equals=None, what="") -> str:
    """The src of the viewer's one image once it differs from / equals the given one (polled); fails after
    REDRAW_S naming ``what``."""
    deadline = time.monotonic() + REDRAW_S
    while True:
        srcs = [img.get_attribute("src") for img in image.all()]
        src = srcs[0] if len(srcs) == 1 else None
        if src is not None and src.startswith("data:image/png;base64,") and src != differs_from \
                and (equals is None or src == equals):
            return src
        if time.monotonic() > deadline:
            digests = [hashlib.sha1(s.encode()).hexdigest()[:10] for s in srcs if s]
            expected = "unchanged" if equals is None else "not the expected one"
            pytest.fail(f"{what}: the viewer's image is {expected} after {REDRAW_S} s "
                        f"({len(srcs)} image(s) shown, sha1 {digests})")
        time.sleep(0.2)


def test_viewer_redraws_when_the_slice_slider_and_structure_selector_move(page, jupyterlab, tmp_path):
    """Run All in JupyterLab; then the slice slider and the structure selector each redraw the image."""
    from playwright.sync_api import expect

    base, token, name, server_log = jupyterlab
    page.goto(f"{base}/lab/tree/{name}?token={token}")
    page.wait_for_function("""() => {
        const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const kernel = panel && panel.sessionContext && panel.sessionContext.session
            && panel.sessionContext.session.kernel;
        return kernel && kernel.status === 'idle'; }""", timeout=KERNEL_S * 1000)
    assert page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayName") \
        == "Python (cmr-ssl)"

    # Run All, as a person would; the command's promise says whether every cell ran without error
    page.evaluate("""() => { window.cmrRunAll = null;
        window.jupyterapp.commands.execute('notebook:run-all-cells').then(
            ok => { window.cmrRunAll = ok; }, err => { window.cmrRunAll = String(err); }); }""")
    page.wait_for_function("window.cmrRunAll !== null", timeout=RUN_ALL_S * 1000)
    if page.evaluate("window.cmrRunAll") is not True:
        page.screenshot(path=tmp_path / "run_all.png")
        errors = page.locator('[data-mime-type="application/vnd.jupyter.error"]').all_inner_texts()
        pytest.fail(f"Run All did not finish cleanly ({page.evaluate('window.cmrRunAll')}); cell errors: "
                    f"{errors[-1][-3000:] if errors else 'none shown'}\nserver log:\n"
                    f"{server_log.read_text()[-2000:]}\nscreenshot: {tmp_path / 'run_all.png'}")

    viewer = page.locator(".widget-vbox").filter(has=page.locator(".widget-slider")) \
        .filter(has=page.locator(".widget-output"))
    expect(viewer).to_have_count(1)
    image = viewer.locator(".widget-output img")
    slider = viewer.locator(".widget-slider").filter(has=page.locator("label", has_text="slice"))
    structure = viewer.locator(".widget-dropdown").filter(has=page.locator("label", has_text="structure")) \
        .locator("select")
    first = shown(image, what="after Run All")
    expect(slider.locator(".widget-readout")).to_have_text("0")
    expect(structure).to_have_value("LV")

    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    expect(slider.locator(".widget-readout")).to_have_text("1")
    second = shown(image, differs_from=first, what="slice slider 0 -> 1")

    structure.select_option("RV")
    third = shown(image, differs_from=second, what="structure LV -> RV")
    assert third != first

    # back to the first selection: the first image again, byte for byte (CAMs are cached, drawing is deterministic)
    structure.select_option("LV")
    shown(image, equals=second, what="structure RV -> LV")
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowLeft")
    expect(slider.locator(".widget-readout")).to_have_text("0")
    shown(image, equals=first, what="back to slice 0, LV")
