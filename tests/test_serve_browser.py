"""The search page in a real browser: headless Chromium (Debian's package, driven by playwright) against a
running `contrastive serve` on loopback, used by keyboard as a person would; each grid is checked against the
API's answer to the same query (tests/test_serve.py checks the API against `contrastive search`).

CONTRASTIVE_SERVE_TEST_INDEX=DIR runs it on an existing index instead of a random model's (how the README's
screenshot was made); CONTRASTIVE_SCREENSHOT=PNG copies the screenshot there.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
K = 12


def _skip_reason() -> str | None:
    if CHROMIUM is None:
        return "no Chromium here (apt-get install chromium; .ci/run installs it)"
    try:
        import httpx  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright or httpx is not installed (pip install -e '.[dev]')"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, synthetic_data):
    """`contrastive serve` in its own process on a loopback port; yields its base URL and index."""
    import httpx

    if os.environ.get("CONTRASTIVE_SERVE_TEST_INDEX"):
        index = Path(os.environ["CONTRASTIVE_SERVE_TEST_INDEX"])
    else:
        from tests.test_serve import build_index

        _, index = build_index(tmp_path_factory.mktemp("browser"), synthetic_data["val"])
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "contrastive.cli", "serve", "--index", str(index), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"contrastive serve exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(base + "health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"contrastive serve did not answer in 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield {"base": base, "index": index}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 900})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def metadata(index: Path):
    import pandas as pd

    return pd.concat([pd.read_parquet(f) for f in sorted((index / "metadata").glob("*.parquet"))],
                     ignore_index=True)


def image_of(index: Path, key: str, out: Path) -> Path:
    """The indexed image's bytes, from its shard (as a user's file would be)."""
    from contrastive.eval.image_store import LOCATIONS_FILE

    import pandas as pd

    locations = pd.read_parquet(index / LOCATIONS_FILE)
    row = metadata(index)["image_path"].astype(str).tolist().index(key)
    with tarfile.open(locations["shard"][row]) as tar:
        out.write_bytes(tar.extractfile(f"{key}.{locations['ext'][row]}").read())
    return out


def tab_to(page, element_id: str, *, max_presses: int = 12) -> None:
    """Press Tab until the element has the focus: it must be reachable by keyboard."""
    for _ in range(max_presses):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} not reached with {max_presses} Tab presses")


def submit_with_enter(page) -> dict:
    """Press Enter in the focused field; the API's answer once the page has drawn it."""
    with page.expect_response(lambda r: r.url.endswith("/search")) as answer:
        page.keyboard.press("Enter")
    page.wait_for_selector("#spinner", state="hidden")
    return answer.value


def grid(page) -> list[dict]:
    return page.eval_on_selector_all("#results > li.hit", """nodes => nodes.map(n => ({
        key: n.dataset.key, color: n.getAttribute('data-attr-color'),
        caption: n.querySelector('.caption').textContent, attributes: n.querySelector('.attributes').textContent,
        img: n.querySelector('img.thumb') && n.querySelector('img.thumb').naturalWidth,
        link: n.querySelector('a.full') && n.querySelector('a.full').href}))""")


def test_search_page_by_keyboard(server, page, tmp_path):
    import httpx

    base, index = server["base"], server["index"]
    meta = metadata(index)
    color_of = dict(zip(meta["image_path"].astype(str), meta["color"]))
    page.goto(base)
    page.wait_for_function("document.getElementById('info').textContent.includes('images')")

    # 1. Text: "red" typed into the focused search box, Enter.
    assert page.evaluate("document.activeElement.id") == "text"
    page.keyboard.type("red")
    page.fill("#k", str(K))
    page.focus("#text")
    assert submit_with_enter(page).ok
    reference = httpx.post(base + "search", json={"text": "red", "k": K}).json()["results"]
    shown = grid(page)
    assert len(shown) == K and [h["key"] for h in shown] == [h["key"] for h in reference]
    assert shown[0]["color"] == color_of[reference[0]["key"]] and f"color: {shown[0]['color']}" in shown[0]["attributes"]
    page.wait_for_function("[...document.querySelectorAll('#results img.thumb')].every(i => i.complete && i.naturalWidth > 0)")
    assert shown[0]["link"].startswith(base + "image/")

    # 2. An image query: a blue object's image, minus "blue", plus "green" (its weight raised to 1.2 by arrow
    # keys on its slider). While the answer is on its way the spinner shows.
    blue_key = next(k for k, c in color_of.items() if c == "blue")
    query_file = image_of(index, blue_key, tmp_path / "query.jpg")
    page.fill("#text", "")
    page.set_input_files("#file", str(query_file))
    page.focus("#text")
    tab_to(page, "minus-1")
    page.keyboard.type("blue")
    tab_to(page, "plus-1")
    page.keyboard.type("green")
    page.keyboard.press("Tab")  # the plus weight slider
    assert page.evaluate("document.activeElement.classList.contains('term-weight')")
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    assert page.input_value("#plus-set .term-weight") == "1.2"
    page.evaluate("""() => { const real = window.fetch;
        window.fetch = (...args) => new Promise(r => setTimeout(r, 700)).then(() => real(...args)); }""")
    page.focus("#plus-1")
    with page.expect_response(lambda r: r.url.endswith("/search")) as answer:
        page.keyboard.press("Enter")
        page.wait_for_selector("#spinner", state="visible")
    assert answer.value.ok
    page.wait_for_selector("#spinner", state="hidden")
    query = {"minus": [{"text": "blue", "weight": 1}], "plus": [{"text": "green", "weight": 1.2}], "k": K,
             "modality": "image"}
    with open(query_file, "rb") as f:
        reference = httpx.post(base + "search", data={"query": json.dumps(query)},
                               files={"image": ("query.jpg", f, "image/jpeg")}).json()
    shown = grid(page)
    assert len(shown) == K and [h["key"] for h in shown] == [h["key"] for h in reference["results"]]
    assert shown[0]["color"] == color_of[reference["results"][0]["key"]]
    assert blue_key not in [h["key"] for h in shown]  # the query image itself is left out
    page.wait_for_function("[...document.querySelectorAll('#results img.thumb')].every(i => i.complete && i.naturalWidth > 0)")
    screenshot = tmp_path / "serve_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    from PIL import Image

    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 1000 and shot.getextrema() != ((0, 0), (0, 0), (0, 0))
    if os.environ.get("CONTRASTIVE_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["CONTRASTIVE_SCREENSHOT"])
    print(f"screenshot: {screenshot}")

    # 3. An error from the API is shown as a readable line, and the page goes on working.
    (tmp_path / "notes.txt").write_text("not an image")
    page.set_input_files("#file", str(tmp_path / "notes.txt"))
    page.focus("#text")
    assert submit_with_enter(page).status == 415
    error = page.text_content("#error")
    assert page.is_visible("#error") and error.startswith("Search failed: the upload is not an image")
    page.click("#clear-image")
    page.fill("#text", "green")
    page.focus("#text")
    assert submit_with_enter(page).ok
    assert not page.is_visible("#error") and len(grid(page)) == K
