"""The course site (`make book`), opened in a real headless Chromium.

Built from executed chapters named by `KVLAB_BOOK_EXECUTED` (`make book-test` executes every chapter
small into build/book-test/course and sets it); skipped in `make test`, where nothing sets it. When
it is set, a missing Chromium or Jupyter Book is a failure, not a skip.
"""
import io
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest

from kvlab.course import book
from kvlab.course.paths import chapters

EXECUTED = os.environ.get("KVLAB_BOOK_EXECUTED")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not EXECUTED, reason="the site test runs in `make book-test`")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = Path(os.environ.get("KVLAB_BOOK_OUT") or tmp_path_factory.mktemp("book")).resolve()
    return book.build(Path(EXECUTED).resolve(), out)


@pytest.fixture(scope="module")
def browser():
    from _browser import Browser, chromium

    exe = chromium()
    assert exe, "make book-test needs Chromium (Debian: apt-get install chromium)"
    b = Browser(exe)
    yield b
    b.close()


def _images_shown(nb) -> int:
    return sum(any(k.startswith("image/") for k in out.get("data", {}))
               for c in nb.cells if c.cell_type == "code" for out in c.get("outputs", []))


def test_every_page_loads_with_its_images_and_no_broken_internal_link(site, browser):
    pages = [site / "intro.html", site / "glossary.html"] + [site / f"{p.stem}.html"
                                                             for p in chapters(Path(EXECUTED))]
    for page in pages:
        assert page.exists(), f"{page.name} was not built"
        browser.open(page.as_uri())
        assert browser.js("document.readyState") == "complete"
        images = browser.js("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        broken = [src for src, complete, width in images if not (complete and width > 0)]
        assert not broken, f"{page.name}: images that did not load: {broken}"
        links = browser.js("[...document.querySelectorAll('a[href]')].map(a => a.href)")
        missing = []
        for href in links:
            url = urlparse(href)
            if url.scheme != "file":
                continue
            target = Path(unquote(url.path))
            if not target.exists():
                missing.append(href)
            elif url.fragment and target.suffix == ".html":
                html = target.read_text(errors="replace")
                if f'id="{url.fragment}"' not in html:
                    missing.append(href)
        assert not missing, f"{page.name}: broken internal links {missing[:5]}"
        if page.stem[:2].isdigit():
            # every figure the executed chapter shows is on its page, and the page says its study time
            nb = nbformat.read(Path(EXECUTED) / f"{page.stem}.ipynb", as_version=4)
            assert len(images) >= _images_shown(nb), f"{page.name}: fewer images than the notebook shows"
            text = browser.js("document.body.innerText")
            assert "Estimated study time: about" in text and "minutes" in text


def test_the_glossary_defines_the_course_terms(site, browser):
    browser.open((site / "glossary.html").as_uri())
    text = browser.js("document.body.innerText")
    for term in ("TTFT", "TPOT", "ITL", "Block table", "Slot mapping", "MBU / MFU", "Ridge point"):
        assert term in text, term


def test_a_screenshot_of_a_chapter_shows_its_figure(site, browser):
    """The first figure of a chapter page, as Chromium painted it, matches the figure file."""
    from PIL import Image, ImageChops, ImageStat

    page = next(site / f"{p.stem}.html" for p in chapters(Path(EXECUTED))
                if _images_shown(nbformat.read(p, as_version=4)))
    browser.open(page.as_uri())
    rect = browser.js("""(async () => {
        const img = [...document.images].find(i => i.src.includes('_images/') && i.naturalWidth > 200);
        img.scrollIntoView();
        await img.decode();                                  // decoded, not still loading
        await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));   // painted
        const r = img.getBoundingClientRect();
        return {src: img.getAttribute('src'), x: r.left + window.scrollX, y: r.top + window.scrollY,
                width: r.width, height: r.height};
    })()""")
    shot = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")      # the whole page
    x, y, w, h = (round(rect[k]) for k in ("x", "y", "width", "height"))
    around = {"x": 0, "y": max(0, y - 300), "width": shot.size[0], "height": h + 400}
    Path(os.environ.get("KVLAB_BOOK_OUT") or site).joinpath("screenshot.png").write_bytes(
        browser.screenshot(around))                                             # for a person to look at
    assert w > 200 and h > 100, f"the figure is drawn {w} x {h} px"
    painted = shot.crop((x, y, x + w, y + h))
    with Image.open(site / rect["src"]) as f:
        expected = f.convert("RGB").resize((w, h), Image.LANCZOS)
    diff = ImageStat.Stat(ImageChops.difference(painted, expected)).mean
    assert max(diff) < 12, f"{page.name}: the painted figure differs from {rect['src']} by {diff}"
    assert max(ImageStat.Stat(painted).stddev) > 20, "the painted region is blank"
