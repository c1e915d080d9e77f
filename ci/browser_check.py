"""Open every page of the built book in headless Chromium and check what a reader sees.

    python ci/browser_check.py  # after `make book`; `make browser-check` does both

For each page in ``_toc.yml`` (opened as a ``file://`` URL, as a reader opens the built book,
with no network) it asserts that:

- the math rendered: MathJax 3 loaded from the book's own files (no CDN), every math element
  holds MathJax output and none of it is a TeX error, and no raw TeX (``$$``, ``\\(``,
  ``\\[``, ``\\frac``...) is left in the visible text outside code, and no display
  equation is wider than the text column (the reader would scroll it sideways);
- every figure (``img``) loaded (``naturalWidth > 0``);
- no script or stylesheet is fetched from the network (the book reads offline);
- on a chapter notebook, the launch menu holds the Colab and Binder buttons, with the
  addresses of this chapter in the repository of ``_config.yml``, and a click shows them.

A full-page screenshot of each page goes to ``_build/screenshots/``. Chromium and ChromeDriver
are Debian's (``apt-get install chromium chromium-driver``, which ``.ci/run`` does).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless, and nothing that reaches for the network on its own (this machine has none).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1280,1000",
    "--hide-scrollbars",
]
TIMEOUT = 60  # seconds, for a page load, MathJax's typesetting, a figure (2 shared cores)
# Screenshots are taken in tiles at most this tall (Chromium's limit is 16384 pixels).
TILE_HEIGHT = 8000

# Raw TeX in visible prose (code blocks and MathJax's output excluded), as JavaScript regular
# expressions: what is left on the page when the math did not render.
RAW_TEX = {
    "$$": r"\$\$",
    "\\( or \\)": r"\\[()]",
    "\\[ or \\]": r"\\[\[\]]",
    "a TeX command such as \\frac": r"\\[A-Za-z]{2,}",
    "$...$ with TeX inside": r"\$[^$\s][^$]*[\\^_{}][^$]*\$",
}

# Everything measured on a page, in one script: math, raw TeX, figures, network resources.
_INSPECT_JS = """
const visible = (el) => el.checkVisibility({checkVisibilityCSS: true, visibilityProperty: true});
const result = {};
const deadline = Date.now() + timeoutMs;

// MathJax: wait for its first typesetting of the page (startup.promise). Its script is
// deferred, so it has run by the load event, which the page load waited for: a few seconds'
// grace, no more, for a MathJax that is not there.
const mathElements = Array.from(document.querySelectorAll(".math"));
result.math = mathElements.length;
const grace = Date.now() + 5000;
while (mathElements.length && !(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
  if (Date.now() > grace) break;
  await new Promise((r) => setTimeout(r, 50));
}
result.mathjax = null;
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  try {
    await MathJax.startup.promise;
    result.mathjax = MathJax.version;
  } catch (e) {
    result.mathjaxError = String(e);
  }
}
result.unrendered = mathElements
  .filter((el) => !el.querySelector("mjx-container"))
  .map((el) => el.textContent.trim().slice(0, 120));
result.texErrors = Array.from(document.querySelectorAll("mjx-merror")).map(
  (el) => el.getAttribute("data-mjx-error") || el.textContent.slice(0, 120)
);
// An undefined macro (\\bm, say) is no error to MathJax: it shows its name in red.
if (result.mathjax && MathJax.startup.document) {
  for (const item of MathJax.startup.document.math) {
    const mml = MathJax.startup.toMML(item.root);
    const undefinedMacro = mml.match(/<mtext[^>]*mathcolor="red"[^>]*>(\\\\[^<]*)</);
    if (undefinedMacro) result.texErrors.push(`undefined macro ${undefinedMacro[1]}`);
  }
}
// Display equations wider than the column: the reader would have to scroll them sideways.
result.wideMath = [];
if (result.mathjax && MathJax.startup.document) {
  for (const item of MathJax.startup.document.math) {
    const root = item.typesetRoot;
    if (item.display && root && root.scrollWidth > root.clientWidth + 1) {
      result.wideMath.push(
        `${root.scrollWidth} px in ${root.clientWidth}: ` +
          item.math.replace(/\\s+/g, " ").trim().slice(0, 60)
      );
    }
  }
}

// MathJax's web fonts, loaded from file:// URLs like the rest of the book.
await document.fonts.ready;
result.fontErrors = Array.from(document.fonts)
  .filter((font) => font.status === "error")
  .map((font) => font.family);
result.mathjaxScripts = Array.from(document.scripts)
  .map((s) => s.src)
  .filter((src) => /mathjax/i.test(src));

// Raw TeX in the visible text, outside code and MathJax's output.
const SKIP =
  "pre, code, kbd, samp, script, style, noscript, textarea, svg, mjx-container, .highlight";
const regexes = Object.entries(patterns).map(([name, source]) => [name, new RegExp(source)]);
result.rawTex = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (walker.nextNode()) {
  const node = walker.currentNode;
  const el = node.parentElement;
  if (!el || el.closest(SKIP) || !visible(el)) continue;
  const text = node.textContent;
  for (const [name, re] of regexes) {
    const m = text.match(re);
    if (m) {
      const at = m.index;
      const context = text.slice(Math.max(0, at - 40), at + 60).replace(/\\s+/g, " ").trim();
      result.rawTex.push({pattern: name, context: context});
    }
  }
}

// Figures: every img, lazy ones too, loaded or failed (or timed out).
const images = Array.from(document.images);
images.forEach((img) => { img.loading = "eager"; });
await Promise.all(images.map((img) => img.complete ? null : new Promise((r) => {
  img.addEventListener("load", r);
  img.addEventListener("error", r);
  setTimeout(r, Math.max(0, deadline - Date.now()));
})));
result.images = images.map((img) => ({
  src: img.getAttribute("src"),
  url: img.currentSrc || img.src,
  ok: img.complete && img.naturalWidth > 0,
}));

// Scripts and stylesheets from the network: a book that reads offline has none.
result.external = [
  ...Array.from(document.querySelectorAll("script[src]")).map((s) => s.src),
  ...Array.from(document.querySelectorAll("link[rel~=stylesheet][href]")).map((l) => l.href),
].filter((url) => /^https?:/.test(url));

// Every link, for the launch buttons.
result.links = Array.from(document.querySelectorAll("a[href]")).map((a) => a.href);
return result;
"""


@dataclasses.dataclass
class PageReport:
    """What one page showed: the counts, and every problem found (empty when it passed)."""

    name: str
    math: int = 0
    mathjax: Optional[str] = None
    images: int = 0
    launch: str = "-"
    screenshot: Optional[Path] = None
    problems: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)  # printed, not failures

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True)
class Launch:
    """The launch buttons a chapter notebook should have."""

    colab: str  # the exact Colab address
    binder_prefix: str  # the Binder address up to the query
    notebook: str  # the notebook's path in the repository, which the Binder address names


@contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """Headless Debian Chromium through Debian's ChromeDriver, with a fresh profile."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            raise SystemExit(
                f"{path} not found: apt-get install chromium chromium-driver (.ci/run does)"
            )
    profile = tempfile.mkdtemp(prefix="se3tutor-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.set_script_timeout(TIMEOUT + 30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """A PNG of the whole page, not only the window.

    The window is made as tall as the page (in tiles of at most TILE_HEIGHT pixels, stitched
    together), with CSS transitions off: Chromium's own capture beyond the viewport caught the
    theme's sidebar half-way through a transition, the page shifted sideways.
    """
    from PIL import Image  # Pillow comes with matplotlib

    # No transitions, and sticky headers and sidebars in place (a sticky element keeps its
    # place in the layout, so this moves nothing else): each shows once, at the top.
    driver.execute_script(
        "const style = document.createElement('style');"
        "style.textContent = '*, *::before, *::after "
        "{transition: none !important; animation: none !important}';"
        "document.head.appendChild(style);"
        "for (const el of document.querySelectorAll('body *'))"
        "  if (getComputedStyle(el).position === 'sticky') el.style.position = 'static';"
    )
    width, height = driver.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]"
    )
    tiles = []
    top = 0
    try:
        while top < height:
            tile = min(TILE_HEIGHT, height - top)
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": tile, "deviceScaleFactor": 1, "mobile": False},
            )
            driver.execute_script("window.scrollTo(0, arguments[0])", top)
            time.sleep(0.3)
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
            tiles.append(Image.open(io.BytesIO(base64.b64decode(shot["data"]))))
            top += tile
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.execute_script("window.scrollTo(0, 0)")
    page = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
    y = 0
    for t in tiles:
        page.paste(t, (0, y))
        y += t.height
    path.parent.mkdir(parents=True, exist_ok=True)
    page.save(path)


def _check_launch(driver: webdriver.Chrome, links: list, launch: Launch, report: PageReport):
    colab = [url for url in links if url == launch.colab]
    binder = [
        url
        for url in links
        if url.startswith(launch.binder_prefix + "?") and launch.notebook in url
    ]
    found = []
    if colab:
        found.append("colab")
    else:
        near = [url for url in links if "colab" in url]
        report.problems.append(f"no Colab button linking to {launch.colab} (links: {near})")
    if binder:
        found.append("binder")
    else:
        near = [url for url in links if "binder" in url]
        report.problems.append(
            f"no Binder button linking to {launch.binder_prefix}?...{launch.notebook} "
            f"(links: {near})"
        )
    if not found:
        report.launch = "none"
        return
    # A reader reaches them through the launch menu: click its toggle, and the buttons show.
    shown = driver.execute_script(
        """
        const [urls] = arguments;
        const links = Array.from(document.querySelectorAll("a[href]"))
          .filter((a) => urls.includes(a.href));
        const menu = links[0].closest(".dropdown");
        const toggle = menu && menu.querySelector("[data-bs-toggle=dropdown], button");
        if (!toggle || !toggle.checkVisibility()) return null;
        toggle.click();
        return links.map((a) => a.checkVisibility({checkVisibilityCSS: true}));
        """,
        colab[:1] + binder[:1],
    )
    if shown is None:
        report.problems.append("the launch menu's button is not visible")
    elif not all(shown):
        report.problems.append("the launch buttons do not show when the launch menu is clicked")
    report.launch = "+".join(found)


def check_page(
    driver: webdriver.Chrome,
    url: str,
    name: str,
    *,
    launch: Optional[Launch] = None,
    screenshot_path: Optional[Path] = None,
) -> PageReport:
    """Open ``url`` and check it; ``launch``: the buttons a notebook page must have."""
    report = PageReport(name=name)
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    info = driver.execute_async_script(
        "const [patterns, timeoutMs, done] = arguments;\n"
        "(async () => {" + _INSPECT_JS + "})()"
        ".then(done, (e) => done({error: String((e && e.stack) || e)}));",
        RAW_TEX,
        TIMEOUT * 1000,
    )
    if "error" in info:
        raise RuntimeError(f"the page check's script failed on {url}: {info['error']}")

    report.math = info["math"]
    report.mathjax = info["mathjax"]
    if info["math"]:
        if not info["mathjax"]:
            report.problems.append(
                f"MathJax did not load ({info.get('mathjaxError') or 'no MathJax on the page'}; "
                f"scripts: {info['mathjaxScripts']})"
            )
        elif not info["mathjax"].startswith("3."):
            report.problems.append(f"MathJax {info['mathjax']}, not 3.x")
        if info["unrendered"]:
            report.problems.append(
                f"{len(info['unrendered'])} of {info['math']} math elements not rendered, "
                f"first: {info['unrendered'][:3]}"
            )
    for wide in info["wideMath"]:
        report.problems.append(f"display math wider than the column, {wide}")
    for family in info["fontErrors"]:
        report.problems.append(f"font not loaded: {family}")
    for error in info["texErrors"]:
        report.problems.append(f"TeX error in the math: {error}")
    for src in info["mathjaxScripts"]:
        if not src.startswith("file:"):
            report.problems.append(f"MathJax comes from {src}, not from the book's own files")
    if info["rawTex"]:
        kinds = sorted({hit["pattern"] for hit in info["rawTex"]})
        first = "; ".join(f"...{hit['context']}..." for hit in info["rawTex"][:3])
        report.problems.append(
            f"raw TeX in the visible text, {len(info['rawTex'])} times ({', '.join(kinds)}), "
            f"first: {first}"
        )

    report.images = len(info["images"])
    for image in info["images"]:
        if not image["ok"]:
            report.problems.append(f"figure not loaded: {image['src']} ({image['url']})")
    for resource in info["external"]:
        report.problems.append(f"fetched from the network (the book must read offline): {resource}")

    # A local file that failed to load (a script, a stylesheet, a font) fails the page; other
    # errors in the console are shown (Jupyter Book 1.x declares sphinx-thebe's THEBE_JS_URL
    # twice on every page, a harmless SyntaxError).
    for entry in driver.get_log("browser"):
        message = entry.get("message", "")
        if entry.get("level") != "SEVERE":
            continue
        if "Failed to load resource" in message or "net::ERR_" in message:
            report.problems.append(f"console: {message[:200]}")
        else:
            report.notes.append(f"console: {message[:200]}")

    if screenshot_path is not None:
        screenshot(driver, screenshot_path)
        report.screenshot = screenshot_path

    if launch is not None:
        _check_launch(driver, info["links"], launch, report)
    return report


def _toc_docnames(toc: dict) -> list:
    """Every document of a jb-book ``_toc.yml``, in reading order."""
    names = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("chapters"))
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return names


def _launch_for(notebook: str, config: dict) -> Launch:
    """The Colab and Binder addresses Jupyter Book 1.x makes for ``notebook`` from the config."""
    repo = config["repository"]
    org_repo = repo["url"].rstrip("/").removeprefix("https://github.com/")
    branch = repo.get("branch", "master")
    path = f"{repo.get('path_to_book', '').strip('/')}/{notebook}".lstrip("/")
    buttons = config["launch_buttons"]
    return Launch(
        colab=f"{buttons['colab_url'].rstrip('/')}/github/{org_repo}/blob/{branch}/{path}",
        binder_prefix=f"{buttons['binderhub_url'].rstrip('/')}/v2/gh/{org_repo}/{branch}",
        notebook=path,
    )


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--book", type=Path, default=ROOT, help="the book's root folder")
    parser.add_argument("--html", type=Path, help="the built HTML (default: BOOK/_build/html)")
    parser.add_argument(
        "--screenshots", type=Path, help="where the PNGs go (default: BOOK/_build/screenshots)"
    )
    args = parser.parse_args(argv)
    book = args.book.resolve()
    html = (args.html or book / "_build" / "html").resolve()
    shots = (args.screenshots or book / "_build" / "screenshots").resolve()
    config = yaml.safe_load((book / "_config.yml").read_text())
    toc = yaml.safe_load((book / "_toc.yml").read_text())

    if not (html / "index.html").exists():
        print(f"{html}/index.html not found: build the book first (make book)", file=sys.stderr)
        return 1
    if shots.exists():
        shutil.rmtree(shots)

    reports = []
    start = time.perf_counter()
    with chromium() as driver:
        print(f"Chromium {driver.capabilities.get('browserVersion')}, pages in {html}")
        for name in _toc_docnames(toc):
            page = html / f"{name}.html"
            if not page.exists():
                reports.append(PageReport(name=name, problems=[f"{page} was not built"]))
                continue
            notebook = (book / f"{name}.ipynb").exists()
            launch = _launch_for(f"{name}.ipynb", config) if notebook else None
            report = check_page(
                driver,
                page.as_uri(),
                name,
                launch=launch,
                screenshot_path=shots / f"{name.replace('/', '_')}.png",
            )
            reports.append(report)
            status = "ok  " if report.ok else "FAIL"
            print(
                f"{status} {name:24s} math {report.math:4d} (MathJax {report.mathjax or '-'})  "
                f"figures {report.images:3d}  launch {report.launch:12s} "
                f"{report.screenshot.relative_to(book) if report.screenshot else ''}"
            )
            for problem in report.problems:
                print(f"       - {problem}")
            for note in report.notes:
                print(f"       (note) {note}")
    failed = [r for r in reports if not r.ok]
    seconds = time.perf_counter() - start
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed ({seconds:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
