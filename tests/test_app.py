"""The web app (v2/app.py) started here on 127.0.0.1 with the committed tiny model, driven in a
real headless browser: Debian's Chromium through Playwright (no browser download; tests/run.sh
installs both). The page's screenshot is saved as a test artifact: in $V2_TEST_ARTIFACTS if set
(the README's docs/app.png comes from there), else in the test's tmp_path."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        "no chromium: apt-get install chromium (tests/run.sh does)", allow_module_level=True
    )
pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[dev]')")
pytest.importorskip("playwright", reason="playwright not installed (pip install -e '.[dev]')")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from tests.test_chat import ANSWER, QUESTION, TINY  # noqa: E402

TIMEOUT = 120_000  # ms: generous, the CPU is shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    from v2.app import App, build, launch
    from v2.generate import FastDLLM

    demo = build(App(FastDLLM.load(TINY)))
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT)
        page.goto(server)
        page.wait_for_selector("#message textarea")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("V2_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


RECORD_STEPS = """() => {
  window.stepLabels = new Set();
  new MutationObserver(() => {
    const e = document.querySelector('#step-label');
    if (e) window.stepLabels.add(e.textContent);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def ask(page, text: str) -> None:
    page.fill("#message textarea", text)
    page.click("#send")


def flops_answer(page) -> float:
    expect(page.locator("#status")).to_contain_text("Last answer", timeout=TIMEOUT)
    text = page.locator("#flops-answer").inner_text()
    return float(re.fullmatch(r"([\d.]+) %", text).group(1))


def choose_policy(page, name: str) -> None:
    page.click("#policy input")
    page.get_by_role("option", name=name, exact=True).click()
    expect(page.locator("#policy input")).to_have_value(name)


def test_app_decodes_and_shows_each_forward(page, artifacts):
    page.evaluate(RECORD_STEPS)
    ask(page, QUESTION)
    expect(page.locator("#chat")).to_contain_text(ANSWER, timeout=TIMEOUT)
    baseline = flops_answer(page)
    assert baseline == 100.0
    # The step view advanced through the forwards while the answer decoded.
    labels = page.evaluate("() => [...window.stepLabels]")
    assert len(labels) >= 2, labels
    final = page.locator("#step-label").inner_text()
    n = int(final.split(" of ")[1])
    assert final == f"{n} of {n}" and n >= 3
    # The block view: committed tokens and a heatmap with every cell computed (no policy).
    assert page.locator("#block span.tok.new").count() >= 1
    assert page.locator("#heatmap td[title$='computed']").count() > 0
    assert page.locator("#heatmap td[title$='reused']").count() == 0

    # Replay: back to the first forward of the answer (its block holds the prompt's end), then
    # through the others: some show masked slots, each commits at least one token.
    final_block = page.locator("#block").inner_html()
    box = page.locator("#replay input[type=number]")
    # the slider counts the forwards as the step label does: from 1, at the last one (n of n)
    expect(box).to_have_value(str(n))
    assert page.locator("#replay input[type=range]").get_attribute("min") == "1"
    assert page.locator("#replay input[type=range]").get_attribute("max") == str(n)

    def replay(i: int) -> None:  # the slider at i shows forward "i of n"
        box.fill(str(i))
        box.press("Enter")
        expect(page.locator("#step-label")).to_have_text(f"{i} of {n}")

    replay(1)
    assert page.locator("#block span.tok.prompt").count() > 0
    assert page.locator("#block").inner_html() != final_block
    masked = []
    for i in range(2, n + 1):
        replay(i)
        assert page.locator("#block span.tok.new").count() >= 1
        masked.append(page.locator("#block span.tok.masked").count())
    assert max(masked) > 0, masked

    replay(n // 2)
    page.screenshot(path=str(artifacts / "app.png"), full_page=True)
    assert (artifacts / "app.png").stat().st_size > 10_000


def test_policy_switch_changes_statistics(page, artifacts):
    page.click("#clear")
    choose_policy(page, "token")
    option = page.locator("#opt-token-min_layer").get_by_role("textbox")
    option.fill("0")  # not allowed: a message on the page, nothing runs
    ask(page, QUESTION)
    expect(page.locator("#status")).to_contain_text("min_layer must be >= 1", timeout=TIMEOUT)
    option.fill("")
    page.locator("#opt-token-cosine_threshold").get_by_role("textbox").fill("0.9")
    ask(page, QUESTION)
    expect(page.locator("#chat")).to_contain_text(ANSWER, timeout=TIMEOUT)
    skipping = flops_answer(page)
    assert skipping < 90.0
    assert page.locator("#heatmap td[title$='reused']").count() > 0
    n = int(page.locator("#step-label").inner_text().split(" of ")[1])
    box = page.locator("#replay input[type=number]")
    box.fill(str(n // 2))
    box.press("Enter")
    expect(page.locator("#step-label")).to_have_text(f"{n // 2} of {n}")
    page.screenshot(path=str(artifacts / "app-token.png"), full_page=True)

    # A prompt longer than the model's positions: a message, and the app serves on.
    page.click("#clear")
    ask(page, "Jack " * 1200)
    expect(page.locator("#status")).to_contain_text("positions", timeout=TIMEOUT)
    # the page's own control, not the chatbot's /reset
    expect(page.locator("#status")).to_contain_text("press Clear to start over")
    expect(page.locator("#status")).not_to_contain_text("/reset")
    choose_policy(page, "none")
    ask(page, QUESTION)
    expect(page.locator("#chat")).to_contain_text(ANSWER, timeout=TIMEOUT)
    assert flops_answer(page) == 100.0
