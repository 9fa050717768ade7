"""The net viewer and the training report in a real browser: the system's Chromium driven by
Playwright (no browser download). Skips cleanly where either is absent.

One browser per module. Each page is checked for what the issue asks: every layer's
``data-layer`` box with its top shapes, a click showing the parameters, the report's series with
as many points as the log, no URL loaded outside the file, no console error, narrow screens and
dark mode. With ``NETENGINE_SCREENSHOTS=1`` the screenshots go to docs/ (the README shows them),
else to a temporary folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from test_html_report import series, trained  # noqa: F401 - `trained` is a fixture

from netengine import summary
from netengine.formats import caffe_log
from netengine.html import net_view

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = os.environ.get("CHROMIUM") or next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")) if p), None)
if CHROMIUM is None:
    pytest.skip("no system Chromium (install the distribution's chromium package)",
                allow_module_level=True)

NETS = {"lenet": "nets/mnist_train_test.prototxt", "bn": "nets/mnist_bn_train_test.prototxt",
        "inception": "nets/mnist_inception_train_test.prototxt"}
LAYOUTS = [pytest.param(True, id="dot", marks=pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz dot is not installed")),
    pytest.param(False, id="list")]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        try:  # --no-sandbox: test machines and containers often run as root
            chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                                  args=["--no-sandbox"])
        except sync_api.Error as err:
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(err).splitlines()[0]}")
        yield chromium
        chromium.close()


class Opened:
    """A page loaded from a file, with every request and console error it made."""

    def __init__(self, browser, path: Path, width: int = 1100, dark: bool = False) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 900},
                                           color_scheme="dark" if dark else "light")
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")
        self.url = path.as_uri()

    def check_clean(self) -> None:
        assert self.errors == []
        assert [url for url in self.requests if url != self.url] == []

    def close(self) -> None:
        self.context.close()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    return REPO / "docs" / name if os.environ.get("NETENGINE_SCREENSHOTS") else tmp_path / name


def write_view(tmp_path: Path, key: str, use_dot: bool, phase: str = "TRAIN"):
    cwd = os.getcwd()
    os.chdir(REPO)  # the page names the file as given: relative to the repository
    try:
        net = summary.build(NETS[key], summary.PHASES[phase])
    finally:
        os.chdir(cwd)
    path = tmp_path / f"{key}.html"
    path.write_text(net_view.build_page(net, use_dot=use_dot), encoding="utf-8")
    return net, path


@pytest.mark.parametrize("use_dot", LAYOUTS)
@pytest.mark.parametrize("key", sorted(NETS))
def test_every_layer_has_its_box_with_its_top_shapes(browser, tmp_path, key, use_dot):
    net, path = write_view(tmp_path, key, use_dot)
    opened = Opened(browser, path)
    try:
        rows = summary.summarize(net).rows
        assert opened.page.locator("[data-layer]").count() == len(rows)
        for row in rows:
            box = opened.page.locator(f'[data-layer="{row.name}"]')
            assert box.count() == 1, row.name
            text = box.text_content()
            assert row.type in text
            for _, shape in row.tops:
                assert net_view.shape_text(shape) in text, (row.name, text)
        opened.check_clean()
    finally:
        opened.close()


@pytest.mark.parametrize("use_dot", LAYOUTS)
def test_a_click_shows_the_layers_parameters(browser, tmp_path, use_dot):
    _, path = write_view(tmp_path, "lenet", use_dot)
    opened = Opened(browser, path)
    try:
        page, details = opened.page, opened.page.locator("#details")
        page.locator('[data-layer="conv1"]').click()
        text = details.text_content()
        for part in ("conv1", "Convolution", "num_output: 20", "kernel_size: 5", "520",
                     "18,432,000", "lr_mult: 2", "64×20×24×24"):
            assert part in text, part
        page.locator('[data-layer="ip1"]').hover()
        assert "num_output: 500" in details.text_content()
        page.mouse.move(0, 0)  # leaving a box shows the selected layer again
        assert "kernel_size: 5" in details.text_content()
        if use_dot:
            page.screenshot(path=str(screenshot_path(tmp_path, "net_view.png")))
        opened.check_clean()
    finally:
        opened.close()


def test_the_training_report_has_the_logs_series(browser, trained, tmp_path):  # noqa: F811
    log_path, report, writes = trained
    tables = caffe_log.parse_log(log_path)
    opened = Opened(browser, report)
    try:
        counts = opened.page.evaluate("""() => {
            const out = {};
            document.querySelectorAll("figure[data-series]").forEach(fig => {
                const lines = {};
                fig.querySelectorAll("polyline").forEach(line => {
                    lines[line.dataset.phase] = line.points.numberOfItems; });
                out[fig.dataset.series] = lines; });
            return out; }""")
        assert counts["loss"] == {"train": len(tables.train), "test": len(tables.test)}
        assert counts["accuracy"] == {"test": len(tables.test)}
        assert counts == series(report.read_text())
        assert opened.page.locator('meta[http-equiv="refresh"]').count() == 0
        opened.page.screenshot(path=str(screenshot_path(tmp_path, "run_report.png")),
                               full_page=True)
        opened.check_clean()
    finally:
        opened.close()
    alive = tmp_path / "alive.html"  # a page written while the run went on
    alive.write_text(writes[len(writes) // 2], encoding="utf-8")
    opened = Opened(browser, alive)
    try:
        assert opened.page.locator('meta[http-equiv="refresh"]').count() == 1
        assert opened.page.locator("figure[data-series]").count() >= 2
        opened.check_clean()
    finally:
        opened.close()


def _fits_and_colours(opened: Opened) -> tuple[int, int, float]:
    width, inner = opened.page.evaluate(
        "() => [document.documentElement.scrollWidth, window.innerWidth]")
    rgb = opened.page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    channels = [int(c) for c in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]]
    return width, inner, sum(channels) / (3 * 255)


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_narrow_screens_and_colour_schemes(browser, trained, tmp_path, dark):  # noqa: F811
    _, report, _ = trained
    _, view = write_view(tmp_path, "inception", shutil.which("dot") is not None)
    for path in (view, report):
        opened = Opened(browser, path, width=375, dark=dark)
        try:
            width, inner, brightness = _fits_and_colours(opened)
            assert width <= inner, f"{path.name} is wider than a phone: {width} > {inner}"
            assert (brightness < 0.3) if dark else (brightness > 0.9)
            opened.check_clean()
        finally:
            opened.close()
