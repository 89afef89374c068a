"""``npucc monitor`` (issue 16, point 4): a load on a two-mode package, the automatic policy
switching under it, and the dashboard.html it writes — self-contained, written only over our
own file, and checked in a real headless browser (Debian's chromium): no console messages,
every chart rendered by plotly.js, a screenshot that is not blank.

The README's screenshot command is the one :func:`_chromium` runs.
"""

from __future__ import annotations

import contextlib
import html.parser
import io
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("plotly")

from compiler.cli import main  # noqa: E402
from compiler.dashboard import GENERATOR  # noqa: E402
from compiler.errors import NpuccError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHARTS = ("gauge", "timeline", "kernels", "split")


@pytest.fixture(scope="module")
def two_mode_package(tmp_path_factory):
    """The digits CNN for kirin990 in the default modes (dense int8 / fp32), with reports."""
    from compiler.modes import compile_modes

    digit = np.load(REPO / "examples" / "digit.npy")
    d = tmp_path_factory.mktemp("monitor")
    mm = compile_modes(REPO / "examples" / "digits_cnn.onnx", "kirin990",
                       calibration=[{"image": digit}], progress=False)
    path = mm.save(d / "digits.npkg", device_libraries=False)
    np.save(d / "digit.npy", digit)
    return path, d


@pytest.fixture(scope="module")
def dashboard(two_mode_package):
    """``npucc monitor`` from the command line; the automatic policy must switch: a budget no
    run can meet sends the accurate mode to the fast one after ``--window`` runs."""
    path, d = two_mode_package
    out = d / "dashboard.html"
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        rc = main(["monitor", str(path), "--input", str(d / "digit.npy"), "--duration", "3",
                   "--threads", "2", "--budget-ms", "0.000001", "--window", "10", "--mode",
                   "accuracy", "-o", str(out)])
    assert rc == 0
    return out, printed.getvalue()


def test_monitor_switches_and_writes_a_self_contained_page(dashboard):
    path, printed = dashboard
    print(printed)
    text = path.read_text()
    assert re.search(r"accuracy -> performance \(auto: p90 [\d.]+ ms over the budget", printed)
    assert "performance:" in printed and "p90" in printed
    assert f'<meta name="generator" content="{GENERATOR}">' in text
    # no network at view time: no external script, stylesheet or image
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"?(https?:)?//", text)
    assert "plotly.js v" in text or "plotly.min.js" in text or "Plotly" in text
    assert len(text) > 3_000_000     # plotly.js itself is inlined (~4.5 MB)
    for chart in CHARTS:
        assert f'id="{chart}"' in text
    assert "→ performance (auto)" in text   # the switch is marked on the timeline


def test_dashboard_is_written_only_over_our_own(two_mode_package, dashboard):
    from compiler.cli_monitor import monitor

    dashboard = dashboard[0]
    path, d = two_mode_package
    foreign = d / "notes.html"
    foreign.write_text("<html>my notes</html>")
    with pytest.raises(NpuccError, match="refusing to overwrite .*notes.html: it is not a "
                                         "dashboard written by npucc monitor"):
        monitor(path, duration=0.2, threads=1, output=foreign)
    assert foreign.read_text() == "<html>my notes</html>"
    link = d / "link.html"
    link.symlink_to(foreign)
    with pytest.raises(NpuccError, match="symbolic link"):
        monitor(path, duration=0.2, threads=1, output=link)
    # the CLI refuses before running its load, with the same message and exit code 1
    assert main(["monitor", str(path), "--random", "--duration", "30", "-o",
                 str(foreign)]) == 1
    mine = d / "again.html"
    shutil.copy(dashboard, mine)
    data = monitor(path, duration=0.2, threads=1, output=mine)   # ours: replaced
    assert data["output"] == str(mine) and mine.read_text() != dashboard.read_text()
    assert not list(d.glob(".again.html.*"))   # no temporary file left behind


# -- the headless browser ----------------------------------------------------------------------
def _chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", *flags, url],
                          capture_output=True, text=True, timeout=180)


def _console_messages(stderr: str) -> list[str]:
    """Every console message of the page (chromium logs them all as ``INFO:CONSOLE``,
    whatever their level: log, warning, error or an uncaught exception)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


class _Charts(html.parser.HTMLParser):
    """Classes of the elements with our chart ids, and how many plotly SVG roots exist."""

    def __init__(self):
        super().__init__()
        self.classes: dict[str, str] = {}
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id") in CHARTS:
            self.classes[a["id"]] = a.get("class") or ""
        if tag == "svg" and "main-svg" in (a.get("class") or ""):
            self.svgs += 1


needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")


@needs_chromium
def test_console_check_catches_a_broken_page(tmp_path):
    """The browser check can fail: a page with an error and an uncaught exception is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><div id='gauge'></div><script>console.error('boom');"
                   "notAFunction();</script></body></html>")
    r = _chromium(bad.as_uri(), "--dump-dom")
    msgs = _console_messages(r.stderr)
    assert any("boom" in m for m in msgs) and any("Uncaught ReferenceError" in m for m in msgs)
    parsed = _Charts()
    parsed.feed(r.stdout)
    assert "js-plotly-plot" not in parsed.classes.get("gauge", "")


@needs_chromium
def test_dashboard_in_headless_chromium(dashboard, tmp_path):
    dashboard = dashboard[0]
    shot = tmp_path / "dashboard.png"
    r = _chromium(dashboard.as_uri(), "--window-size=1400,2400", f"--screenshot={shot}",
                  "--dump-dom")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    assert _console_messages(r.stderr) == []
    parsed = _Charts()
    parsed.feed(r.stdout)
    for chart in CHARTS:   # plotly.js ran and drew every chart
        assert "js-plotly-plot" in parsed.classes.get(chart, ""), (chart, parsed.classes)
    assert parsed.svgs >= 2 * len(CHARTS)
    assert "→ performance (auto)" in r.stdout   # the switch annotation, drawn in the SVG
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    inked = (img.min(axis=-1) < 0.9).mean()
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    print(f"screenshot {shot}: {inked:.1%} of the pixels inked, {colours} colours")
    assert inked > 0.05 and colours > 50
