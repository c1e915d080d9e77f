"""The browser check's own tests: small hand-made pages, each broken in one way.

Run by ``make browser-check`` before the check of the book; they need Debian's chromium and
chromium-driver, and the MathJax copy that ``make book`` stages in ``_build/static``.
"""

import base64
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import browser_check

MATHJAX = browser_check.ROOT / "_build" / "static" / "mathjax" / "tex-mml-chtml.js"
# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
LAUNCH = browser_check.Launch(
    colab="https://colab.research.google.com/github/o/r/blob/main/book/ch.ipynb",
    binder_prefix="https://mybinder.org/v2/gh/o/r/main",
    notebook="book/ch.ipynb",
)
# The launch menu as sphinx-book-theme writes it: a dropdown whose items show on a click.
MENU = """
<div class="dropdown">
  <button data-bs-toggle="dropdown"
          onclick="this.nextElementSibling.style.display = 'block'">launch</button>
  <ul class="dropdown-menu" style="display: none">
    <li><a href="https://mybinder.org/v2/gh/o/r/main?urlpath=tree/book/ch.ipynb">Binder</a></li>
    <li><a href="https://colab.research.google.com/github/o/r/blob/main/book/ch.ipynb">Colab</a></li>
  </ul>
</div>
"""
MATH = '<p>Inline <span class="math">\\(x^2 + \\frac{1}{2}\\)</span>.</p>'
DISPLAY = '<div class="math">\\[\\sum_j \\alpha_{ij} v_{ij}\\]</div>'


@pytest.fixture(scope="module")
def driver():
    if not MATHJAX.exists():
        pytest.fail(f"{MATHJAX} not found: make book stages MathJax there")
    with browser_check.chromium() as driver:
        yield driver


def page(tmp_path: Path, body: str, *, mathjax: str = "local") -> str:
    """Write a page like the book's (MathJax configured as Sphinx does) and give its URL."""
    (tmp_path / "figure.png").write_bytes(PNG)
    src = {"local": MATHJAX.as_uri(), "missing": (tmp_path / "missing.js").as_uri()}[mathjax]
    html = f"""<!DOCTYPE html><html><head><meta charset="utf-8">
<script>window.MathJax = {{"options": {{"processHtmlClass": "math"}}}}</script>
<script defer src="{src}"></script>
</head><body><section class="tex2jax_ignore mathjax_ignore">{body}</section></body></html>"""
    path = tmp_path / "page.html"
    path.write_text(html, encoding="utf-8")
    return path.as_uri()


def check(driver, url, **kwargs):
    report = browser_check.check_page(driver, url, "page", **kwargs)
    return report, "\n".join(report.problems)


def test_a_good_page_passes(driver, tmp_path):
    url = page(tmp_path, MATH + DISPLAY + '<img src="figure.png">' + MENU)
    shot = tmp_path / "shot.png"
    report, problems = check(driver, url, launch=LAUNCH, screenshot_path=shot)
    assert report.ok, problems
    assert (report.math, report.images, report.launch) == (2, 1, "colab+binder")
    assert report.mathjax.startswith("3.")
    assert shot.read_bytes().startswith(b"\x89PNG")


def test_math_without_mathjax_fails(driver, tmp_path):
    report, problems = check(driver, page(tmp_path, MATH + DISPLAY, mathjax="missing"))
    assert "MathJax did not load" in problems
    assert "2 of 2 math elements not rendered" in problems
    assert "raw TeX in the visible text" in problems
    assert "\\( or \\)" in problems and "\\[ or \\]" in problems
    assert "missing.js" in problems  # the console names the file that did not load


def test_raw_tex_outside_math_fails_but_not_in_code_or_hidden(driver, tmp_path):
    body = (
        "<p>Energy $$E = mc^2$$ here.</p>"
        "<p>A fraction \\frac{a}{b} in prose.</p>"
        "<p>Inline $x_i^2$ left as typed.</p>"
        "<pre>label = r'$\\frac{a}{b}$'</pre><code>\\(x\\)</code>"
        '<p style="display: none">\\alpha hidden</p>'
    )
    report, problems = check(driver, page(tmp_path, body))
    assert len(report.problems) == 1, problems
    assert "raw TeX in the visible text, 4 times " in problems  # per text and kind
    assert "($$, $...$ with TeX inside, a TeX command such as \\frac)" in problems
    assert "hidden" not in problems and "label" not in problems


def test_a_tex_error_fails(driver, tmp_path):
    body = '<span class="math">\\(\\left( x\\)</span> <span class="math">\\(\\bm{x}\\)</span>'
    report, problems = check(driver, page(tmp_path, body))
    assert "TeX error in the math: Extra \\left or missing \\right" in problems
    assert "TeX error in the math: undefined macro \\bm" in problems


def test_display_math_wider_than_its_column_fails(driver, tmp_path):
    terms = " + ".join(f"\\alpha_{{{i}}} v_{{{i}}}" for i in range(40))
    body = f'<div style="width: 300px"><div class="math">\\[{terms}\\]</div></div>' + DISPLAY
    report, problems = check(driver, page(tmp_path, body))
    assert len(report.problems) == 1, problems
    assert "display math wider than the column" in problems and "alpha_{0}" in problems


def test_a_missing_figure_fails(driver, tmp_path):
    body = '<img src="figure.png"><img src="_images/gone.png">'
    report, problems = check(driver, page(tmp_path, body))
    assert report.images == 2
    assert len(report.problems) >= 1 and "figure not loaded: _images/gone.png" in problems


def test_missing_launch_buttons_fail(driver, tmp_path):
    report, problems = check(driver, page(tmp_path, MATH), launch=LAUNCH)
    assert "no Colab button" in problems and "no Binder button" in problems
    other = MENU.replace("book/ch.ipynb", "book/other.ipynb")  # another chapter's buttons
    report, problems = check(driver, page(tmp_path, MATH + other), launch=LAUNCH)
    assert "no Colab button" in problems and "no Binder button" in problems


def test_launch_buttons_the_menu_cannot_show_fail(driver, tmp_path):
    stuck = MENU.replace("onclick=", "data-x=")
    report, problems = check(driver, page(tmp_path, stuck), launch=LAUNCH)
    assert "do not show when the launch menu is clicked" in problems


def test_a_script_from_the_network_fails(driver, tmp_path):
    body = MATH + '<script src="http://127.0.0.1:9/mathjax.js"></script>'
    report, problems = check(driver, page(tmp_path, body))
    assert "fetched from the network" in problems
