"""The web UI in a real browser: headless Chromium (Debian's chromium + chromium-driver, which
.ci/run installs) drives ``xti ui`` on the demo model through Selenium.

* Train: the form runs a short training; the loss curve, the validation grid (the very PNG the run
  wrote) and the embedding file appear; Stop is a clean stop (interrupted vectors saved) and the
  run resumes from its folder.
* Mix: the run's file and the shipped ``teal-dotted`` style are loaded, the shape layers go to the
  cross and the colour layers to the style, and the picture shown is pixel-equal to what the
  ``xti generate`` command the page prints writes.
* Inspect: the plots, the nearest tokens and a layer sweep render.
* Errors: a folder without images is one line in the page, and the page keeps working; the
  server serves no file from disk.

Screenshots of each tab go to ``$XTI_TEST_ARTIFACTS`` (default ``tests/artifacts/``). Nothing is
skipped: on a Debian machine where the tests run as root, a missing Chromium is installed from
Debian's packages (once, with a notice); elsewhere, and without Gradio or Selenium, these tests
fail and say what to install.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STYLE = "data/demo-concepts/teal-dotted.xti.safetensors"
CONCEPT = "data/demo-concepts/striped-cross"
INSTALL = (
    "install the browser test requirements: apt-get install chromium chromium-driver; "
    'pip install -e ".[ui]" (CI does both in .ci/run)'
)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # fail, never skip: CI installs the ui extra
    pytest.fail(f"selenium is missing: {INSTALL}", pytrace=False)


# ----------------------------------------------------------------------------- fixtures


def _artifacts() -> Path:
    folder = Path(os.environ.get("XTI_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"xti ui exited with {proc.returncode} before serving", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"xti ui did not answer on {url} within {timeout:.0f} s", pytrace=False)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """A scratch folder for the module (runs, generated images, the latent cache)."""
    with tempfile.TemporaryDirectory(prefix="xti-ui-test-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[str]:
    """``xti ui`` in a subprocess on a free port, from the checkout; its URL."""
    port = _free_port()
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "XTI_LATENT_CACHE": str(work / "latents"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xti", "ui", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_http(url, proc, timeout=120)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.copy(work / "server.log", _artifacts() / "ui-server.log")


def _install_chromium_if_missing() -> None:
    """Debian's chromium and chromium-driver, installed with apt-get when missing and the tests run
    as root (as on a fresh CI or dev machine of this project); otherwise the caller fails with
    what to install."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    print("\ninstalling Debian's chromium and chromium-driver for the browser tests", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):  # fmt: skip
        subprocess.run(cmd, env=env, check=False, capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def driver(work: Path) -> Iterator[Any]:
    """Headless Debian Chromium through its ChromeDriver."""
    _install_chromium_if_missing()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    chromedriver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for exe in (chromium, chromedriver):
        if not Path(exe).is_file():
            pytest.fail(f"{exe} is missing: {INSTALL}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={work / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    d = webdriver.Chrome(service=Service(chromedriver), options=options)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()


# ----------------------------------------------------------------------------- page helpers


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as err:  # the element is being re-rendered
            last = err
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} ({last})", pytrace=False)


def field(d: Any, elem_id: str) -> Any:
    """The input or textarea inside a Gradio component."""
    return d.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")


def fill(d: Any, elem_id: str, text: str) -> None:
    """Replace a field's text as a user types it."""
    el = field(d, elem_id)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    if text:
        el.send_keys(text)
    el.send_keys(Keys.TAB)


def value(d: Any, elem_id: str) -> str:
    return field(d, elem_id).get_attribute("value")


def click(d: Any, elem_id: str) -> None:
    d.find_element(By.ID, elem_id).click()


def text(d: Any, elem_id: str) -> str:
    return d.find_element(By.ID, elem_id).text


def open_tab(d: Any, name: str) -> None:
    """Click a tab's button once the page has drawn it."""
    wait_for(lambda: d.find_elements(By.ID, f"tab-{name}-button"), f"the {name} tab")
    click(d, f"tab-{name}-button")
    time.sleep(0.5)


def status_matching(d: Any, elem_id: str, *words: str, timeout: float = 60.0) -> str:
    """Wait until the status line holds all `words`; fail with the line it shows."""

    def check() -> str:
        line = text(d, elem_id)
        return line if all(w in line for w in words) else ""

    try:
        return wait_for(check, f"{elem_id} to say {words}", timeout)
    except pytest.fail.Exception:
        pytest.fail(f"{elem_id} says {text(d, elem_id)!r}, expected {words}", pytrace=False)


def picture(d: Any, css: str) -> Image.Image:
    """The picture an <img> shows, fetched from the server as the browser fetched it."""
    src = d.find_element(By.CSS_SELECTOR, css).get_attribute("src")
    with urllib.request.urlopen(src, timeout=10) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def pick(d: Any, elem_id: str, label: str) -> None:
    """Pick an option of a Gradio dropdown by its label."""
    field(d, elem_id).click()

    def option() -> Any:
        for li in d.find_elements(By.CSS_SELECTOR, "li[role=option]"):
            if li.text.replace("✓", "").strip() == label:
                return li
        return None

    wait_for(option, f"option {label} of {elem_id}", 10).click()
    wait_for(lambda: value(d, elem_id) == label, f"{elem_id} to show {label}", 10)


def layer_choice(d: Any, layer: str) -> str:
    """The board's choice for a layer (the selected radio's label: ``·``, ``A``, ``B``…)."""
    return d.find_element(By.CSS_SELECTOR, f"#layer-{layer} label.selected span").text


def choose(d: Any, layer: str, label: str) -> None:
    """Set a layer on the board by clicking its radio."""
    d.find_element(
        By.CSS_SELECTOR, f'#layer-{layer} label[data-testid="{label}-radio-label"]'
    ).click()
    wait_for(lambda: layer_choice(d, layer) == label, f"{layer} to show {label}", 10)


def screenshot(d: Any, name: str) -> Path:
    """The whole page as ``<artifacts>/<name>.png``."""
    d.execute_script("window.scrollTo(0, 0)")
    for _ in range(2):  # the page reflows once at the new size
        height = d.execute_script("return document.documentElement.scrollHeight")
        d.set_window_size(1400, min(max(1000, height + 140), 4000))
        time.sleep(0.5)
    path = _artifacts() / f"{name}.png"
    d.save_screenshot(str(path))
    d.set_window_size(1400, 1000)
    return path


def assert_no_traceback(d: Any) -> None:
    page = d.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in page and 'File "' not in page


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- the Train tab


def fill_train_form(d: Any, out: Path, steps: int, every: int) -> None:
    """A short run of the demo concept into `out`."""
    fill(d, "train-images", CONCEPT)
    fill(d, "train-output", str(out))
    fill(d, "train-steps", str(steps))
    fill(d, "train-every", str(every))
    fill(d, "train-seeds", "0 1")
    fill(d, "train-prompts", "a <striped-cross> on a white background")


@pytest.fixture(scope="module")
def trained(server: str, driver: Any, work: Path) -> dict[str, Any]:
    """Train 12 steps through the Train tab; what the page and the folder showed."""
    d = driver
    d.get(server)
    wait_for(lambda: d.find_elements(By.ID, "train-start"), "the Train tab")
    out = work / "run"
    fill_train_form(d, out, steps=12, every=6)
    click(d, "train-check")
    checked = status_matching(d, "train-status", "6 images", "<striped-cross>")
    thumbs = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#train-gallery img"), "thumbs")
    command = wait_for(lambda: value(d, "train-command"), "the command line")
    click(d, "train-start")
    status_matching(d, "train-status", "started")
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#train-loss .mark-line path"), "loss lines")
    done = status_matching(d, "train-status", "wrote", timeout=240)
    grid = wait_for(lambda: picture(d, "#train-grid img"), "the validation grid")
    lines = d.find_elements(By.CSS_SELECTOR, "#train-loss .mark-line path")
    shot = screenshot(d, "ui-train")
    return {
        "out": out,
        "checked": checked,
        "thumbs": len(thumbs),
        "command": command,
        "done": done,
        "grid": grid,
        "progress": text(d, "train-progress"),
        "lines": [line.get_attribute("d") for line in lines],
        "legend": text(d, "train-loss"),
        "screenshot": shot,
    }


def test_train_tab_runs_training_and_shows_it(trained: dict[str, Any]) -> None:
    from xti.tracking import read_metrics

    out = trained["out"]
    embedding = out / "striped-cross.xti.safetensors"
    assert embedding.is_file(), trained["done"]
    assert str(embedding) in trained["done"]
    assert trained["thumbs"] == 6
    # the command is train.py's, with the form's settings
    args = shlex.split(trained["command"])
    assert args[:4] == ["python", "train.py", "--config", "configs/demo.yaml"]
    assert "train.max_steps=12" in args and f"output_dir={out}" in args
    assert "tracking.report_to=jsonl" in args
    # the loss curve's data: one row per step, all 12
    assert [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl")] == list(range(1, 13))
    assert "step 12 / 12" in trained["progress"]
    # the curve: two drawn lines (loss, smoothed), each through all 12 points
    assert len(trained["lines"]) == 2 and "moving average" in trained["legend"]
    assert all(d.count("L") == 11 for d in trained["lines"]), trained["lines"]
    # the grid shown is the last validation PNG of the run, pixel for pixel
    last = Image.open(out / "validation" / "striped-cross-step000012.png").convert("RGB")
    assert same_pixels(trained["grid"], last)
    assert trained["screenshot"].stat().st_size > 10_000


def test_train_tab_stop_saves_and_resume_continues(
    server: str, driver: Any, work: Path, trained: dict[str, Any]
) -> None:
    d = driver
    d.get(server)
    wait_for(lambda: d.find_elements(By.ID, "train-start"), "the Train tab")
    out = work / "stopped"
    fill_train_form(d, out, steps=400, every=0)
    click(d, "train-start")
    status_matching(d, "train-status", "training: step")
    click(d, "train-stop")
    line = status_matching(d, "train-status", "stopped at step", "vectors saved", timeout=60)
    assert (out / "striped-cross.interrupted.xti.safetensors").is_file(), line
    step = int(line.split("stopped at step")[1].split(":")[0])
    # resume from the folder for three more steps
    fill(d, "train-steps", str(step + 3))
    click(d, "train-resume")
    click(d, "train-start")
    status_matching(d, "train-status", "wrote", timeout=120)
    assert "train.resume=latest" in value(d, "train-command")
    from xti.tracking import read_metrics

    steps = [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl")]
    assert steps == list(range(1, step + 4))


# ----------------------------------------------------------------------------- the Mix tab


def test_mix_tab_matches_xti_generate(
    server: str, driver: Any, work: Path, trained: dict[str, Any]
) -> None:
    d = driver
    d.get(server)
    open_tab(d, "mix")
    run_file = trained["out"] / "striped-cross.xti.safetensors"
    fill(d, "mix-files", f"{run_file}\n{STYLE}")
    click(d, "mix-load")
    status_matching(d, "mix-status", "loaded", "<striped-cross>", "<teal-dotted>", timeout=120)
    wait_for(lambda: d.find_elements(By.ID, "layer-IN01"), "the layer board")
    # the demo's shape/colour split: the cross (A) in the shape layers, the style (B) in the
    # colour (16x16) layers
    click(d, "mix-apply")
    status_matching(d, "mix-status", "preset shape/colour")
    wait_for(lambda: layer_choice(d, "IN04") == "A", "IN04 on A")
    board = {name: layer_choice(d, name) for name in ("IN01", "IN02", "MID", "OUT08", "OUT11")}
    assert board == {"IN01": "B", "IN02": "B", "MID": "A", "OUT08": "A", "OUT11": "B"}
    choose(d, "OUT11", "·")  # a layer can be set by hand, and back
    choose(d, "OUT11", "B")
    fill(d, "mix-prompt", "a <striped-cross> on a black background")
    fill(d, "mix-seeds", "0")
    fill(d, "mix-count", "4")
    fill(d, "mix-steps", "12")
    fill(d, "mix-guidance", "4")
    click(d, "mix-generate")
    status_matching(d, "mix-status", "generated", timeout=120)
    shown = wait_for(lambda: picture(d, "#mix-gallery img"), "the generated grid")
    command = value(d, "mix-command")
    assert "--mix '<striped-cross>=IN04-OUT08' '<teal-dotted>=IN01-IN02,OUT09-OUT11'" in command
    # the printed command, run as it is (into our folder), writes the same picture
    args = shlex.split(command)
    assert args[:2] == ["xti", "generate"]
    args[args.index("--out-dir") + 1] = str(work / "cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "xti", *args[1:], "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    cli = Image.open(work / "cli" / "mix-0-grid.png").convert("RGB")
    assert same_pixels(shown, cli)
    # the mix saves as one xti file
    fill(d, "mix-out", str(work / "mixes"))
    click(d, "mix-save")
    status_matching(d, "mix-status", "wrote", "mix.xti.safetensors")
    assert (work / "mixes" / "mix.xti.safetensors").is_file()
    screenshot(d, "ui-mix")
    assert_no_traceback(d)


# ----------------------------------------------------------------------------- the Inspect tab


def test_inspect_tab_plots_tokens_and_sweep(
    server: str, driver: Any, work: Path, trained: dict[str, Any]
) -> None:
    d = driver
    d.get(server)
    open_tab(d, "inspect")
    fill(d, "inspect-file", str(trained["out"] / "striped-cross.xti.safetensors"))
    click(d, "inspect-run")
    status_matching(d, "inspect-status", "<striped-cross>", "16 layers", timeout=120)
    norms = wait_for(lambda: picture(d, "#inspect-norms img"), "the norm chart")
    heat = wait_for(lambda: picture(d, "#inspect-heat img"), "the heat map")
    assert norms.width > 300 and heat.width > 300
    assert np.asarray(heat).std() > 10  # a drawn heat map, not a blank picture
    table = d.find_element(By.CSS_SELECTOR, "#inspect-tokens [role=grid]")
    wait_for(lambda: table.get_attribute("aria-rowcount") == "17", "16 rows of nearest tokens")
    assert "IN01" in d.find_element(By.ID, "inspect-tokens").text
    assert value(d, "sweep-prompt") == "a <striped-cross> on a white background"
    pick(d, "sweep-kind", "levels")
    fill(d, "sweep-seeds", "0 1")
    fill(d, "sweep-steps", "6")
    click(d, "sweep-run")
    status_matching(d, "inspect-status", "6 rows x 2 seeds", "a cross on a white", timeout=180)
    grid = wait_for(lambda: picture(d, "#sweep-grid img"), "the sweep grid")
    assert grid.height == 6 * 96  # none, 4 levels, all; 32-px images enlarged 3x
    command = shlex.split(value(d, "sweep-command"))
    assert command[:2] == ["xti", "sweep"] and "levels" in command
    # the printed command writes the same grid
    command[command.index("--out") + 1] = str(work / "sweep.png")
    run = subprocess.run(
        [sys.executable, "-m", "xti", *command[1:], "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert same_pixels(grid, Image.open(work / "sweep.png").convert("RGB"))
    screenshot(d, "ui-inspect")
    assert_no_traceback(d)


# ----------------------------------------------------------------------------- errors and files


def test_folder_without_images_is_one_line_and_the_page_keeps_working(
    server: str, driver: Any, work: Path
) -> None:
    d = driver
    d.get(server)
    wait_for(lambda: d.find_elements(By.ID, "train-check"), "the Train tab")
    empty = work / "no-images"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("not an image")
    fill(d, "train-images", str(empty))
    click(d, "train-check")
    line = status_matching(d, "train-status", "error:", "contains no images")
    assert "\n" not in line.strip()
    click(d, "train-start")  # Start refuses the same way, and starts nothing
    status_matching(d, "train-status", "error:", "contains no images")
    assert_no_traceback(d)
    screenshot(d, "ui-error")
    fill(d, "train-images", CONCEPT)
    click(d, "train-check")
    status_matching(d, "train-status", "6 images")


def test_server_serves_no_file_from_disk(server: str) -> None:
    for path in (ROOT / "README.md", ROOT / STYLE):
        for route in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(f"{server}{route}{path}", timeout=5) as r:
                    body = r.read()
            except urllib.error.HTTPError as err:
                assert err.code in (403, 404), err
                continue
            assert path.read_bytes() not in body  # an HTML page, never the file
