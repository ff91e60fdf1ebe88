"""The web chat (instructkit/web_chat.py), served on loopback and driven in a real headless Chromium.

Two tiny random models, saved to real files with their run records, answer side by side.
The browser is Debian's (`apt-get install chromium`), driven by Playwright with
`executable_path` (no browser download). The reference answers come from the book's
`generate`. The test also saves the README's screenshot, docs/chat-app.png.
"""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loopback_server import free_port
from test_chat import book_answer, save_model

from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from instructkit.model_files import ModelFileError
from instructkit.web_chat import EMPTY_NOTE, launch, load_models
from previous_chapters import GPTModel

REQUIREMENTS = "pip install -r requirements-app.txt"
pytest.importorskip("gradio", reason=f"the web chat needs Gradio: {REQUIREMENTS}")
playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason=f"the browser tests need Playwright: {REQUIREMENTS}")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "chat-app.png"  # the README's picture of the app
MAX_NEW = 40
TIMEOUT_MS = 90_000  # a busy 2-core machine


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None,
                       reason="no Chromium on PATH (Debian: apt-get install -y chromium)"),
    # Gradio 6.31's queue calls pandas 3 options that pandas now deprecates: not ours to fix.
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]


class Sabotage:
    """A forward pre-hook on the model's token embedding: raises once, or slows each step."""

    def __init__(self):
        self.fail_next = False
        self.delay = 0.0

    def __call__(self, module, args):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure for the test")
        time.sleep(self.delay)


@pytest.fixture(scope="module")
def app(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("chat-app")
    torch.manual_seed(123)
    main_path = save_model(folder, "tiny-sft", GPTModel(TEST_MODE_CONFIG))
    torch.manual_seed(321)
    other_path = save_model(folder, "tiny-other", GPTModel(TEST_MODE_CONFIG))
    models = load_models(main_path, "cpu", compare=other_path)
    sabotage = Sabotage()
    handle = models[0][0].model.tok_emb.register_forward_pre_hook(sabotage)
    demo, url = launch(None, models=models, port=free_port(), quiet=True)
    assert url.startswith("http://127.0.0.1:")
    yield url, [chat for chat, _ in models], sabotage
    handle.remove()
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(app, browser):
    url, _, _ = app
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#instruction textarea")
    # The max-new-tokens setting, through the page as a reader sets it.
    set_max_new_tokens(page, MAX_NEW)
    yield page
    page.close()


def set_max_new_tokens(page, value, attempts=5):
    """Open the settings and type `value` into the slider's number box until the page takes it.

    The send button reads the slider's state, and its range input follows that state. On a busy
    machine the page can still be starting when it is first clicked and typed into, and the click
    or the value is then dropped (once seen in CI), so do both again until the range input shows
    the value.
    """
    box = page.locator("#max-new-tokens input[type=number]")
    slider = page.locator("#max-new-tokens input[type=range]")
    for _ in range(attempts):
        try:
            if not box.is_visible():
                page.get_by_text("Settings (temperature").click()
                box.wait_for(state="visible", timeout=5_000)
            box.fill(str(value))
            box.press("Enter")
            box.blur()
            playwright_api.expect(slider).to_have_value(str(value), timeout=5_000)
            return
        except (AssertionError, playwright_api.Error):  # not taken yet: try again
            continue
    playwright_api.expect(slider).to_have_value(str(value))  # fails with Playwright's report


def record_updates(page):
    """Collect every text the first column's answer shows, as the DOM changes."""
    page.evaluate("""() => {
        window.updates = [];
        new MutationObserver(() => {
            const bots = document.querySelectorAll('#chat-0 [data-testid="bot"]');
            if (bots.length) window.updates.push(bots[bots.length - 1].innerText);
        }).observe(document.querySelector('#chat-0'), {subtree: true, childList: true, characterData: true});
    }""")


def send(page, instruction, input_text=""):
    page.fill("#instruction textarea", instruction)
    page.fill("#input input, #input textarea", input_text)
    page.click("#send")


def bot_texts(page, column):
    return page.locator(f"#chat-{column} [data-testid='bot']").all_inner_texts()


def wait_for_answer(page, column, n_answers, expected=None):
    """Wait until column has n answers, the last one `expected` (or just not growing)."""
    locator = page.locator(f"#chat-{column} [data-testid='bot']")
    locator.nth(n_answers - 1).wait_for()
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    last = None
    while time.monotonic() < deadline:
        text = locator.nth(n_answers - 1).inner_text()
        if (expected is not None and text == expected) or (expected is None and text and text == last):
            return text
        last = text
        page.wait_for_timeout(500)
    return locator.nth(n_answers - 1).inner_text()


def entry(instruction, input_text=""):
    return {"instruction": instruction, "input": input_text}


def test_streamed_answers_side_by_side_equal_generate(app, page, tokenizer, tmp_path):
    _, chats, _ = app
    question = entry("Rewrite the sentence using a simile.", "The car is very fast.")
    expected = [book_answer(chat.model, tokenizer, question, MAX_NEW) for chat in chats]
    assert expected[0] != expected[1] and min(map(len, expected)) > 40

    record_updates(page)
    send(page, question["instruction"], question["input"])
    assert wait_for_answer(page, 0, 1, expected[0]) == expected[0]
    assert wait_for_answer(page, 1, 1, expected[1]) == expected[1]

    shown = page.locator("#chat-0 [data-testid='user']").inner_text()
    assert shown == "Rewrite the sentence using a simile.\n\nInput: The car is very fast."
    updates = [u for u in page.evaluate("window.updates") if u.strip()]
    assert len(set(updates)) > 2, f"the answer did not stream: {updates}"
    assert all(expected[0].startswith(u.strip()) for u in updates)
    assert page.locator("#instruction textarea").input_value() == ""  # cleared for the next turn

    # The page as the README shows it (docs/chat-app.png), written outside the repository: a
    # test run changes no file of the checkout (copy it there by hand to refresh the picture)
    screenshot = tmp_path / SCREENSHOT.name
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_empty_message_gets_a_note(app, page):
    send(page, "   ")
    page.locator("#note").get_by_text(EMPTY_NOTE).wait_for()
    assert bot_texts(page, 0) == [] and bot_texts(page, 1) == []


def test_over_long_input_is_cut_with_a_note(app, page, tokenizer):
    _, chats, _ = app
    send(page, "Summarize the text.", "word " * 400)
    note = page.locator("#note").get_by_text("your text was cut to fit")
    note.wait_for()
    assert f"so that it and a {MAX_NEW}-token answer fit the model's 256-token context" in note.inner_text()
    prompt, ids, _ = chats[0].prepare("Summarize the text.", "word " * 400, MAX_NEW)
    *_, expected = chats[0].stream(prompt, ids, MAX_NEW)
    assert wait_for_answer(page, 0, 1, expected) == expected


def test_generation_error_is_shown_and_the_app_keeps_serving(app, page, tokenizer):
    _, chats, sabotage = app
    sabotage.fail_next = True
    send(page, "Name a primary color.")
    failed = wait_for_answer(page, 0, 1)
    assert failed == "⚠️ Generation failed: RuntimeError: injected failure for the test"
    question = entry("Name a primary color.")
    other = book_answer(chats[1].model, tokenizer, question, MAX_NEW)
    assert wait_for_answer(page, 1, 1, other) == other  # the other column still answered

    expected = book_answer(chats[0].model, tokenizer, question, MAX_NEW)
    send(page, "Name a primary color.")
    assert wait_for_answer(page, 0, 2, expected) == expected


def test_stop_button_ends_the_answer(app, page, tokenizer):
    _, chats, sabotage = app
    question = entry("Give three tips for staying healthy.")
    full = book_answer(chats[0].model, tokenizer, question, MAX_NEW)
    sabotage.delay = 0.3  # about 12 s for the whole answer
    try:
        send(page, question["instruction"])
        page.wait_for_function(
            "() => { const b = document.querySelector('#chat-0 [data-testid=\"bot\"]');"
            " return b && b.innerText.trim().length > 0; }")
        page.click("#stop")
        page.wait_for_timeout(1500)
        stopped = bot_texts(page, 0)[0]
        page.wait_for_timeout(1500)
        assert bot_texts(page, 0)[0] == stopped  # no longer growing
        assert full.startswith(stopped) and len(stopped) < len(full)
    finally:
        sabotage.delay = 0.0
    send(page, question["instruction"])  # and the next message is answered in full
    assert wait_for_answer(page, 0, 2, full) == full


def test_no_pretrained_twin_for_a_size_that_is_no_gpt2(tmp_path):
    torch.manual_seed(1)
    path = save_model(tmp_path, "tiny", GPTModel(TEST_MODE_CONFIG))
    with pytest.raises(ModelFileError, match="is no GPT-2 size, so there is no pretrained GPT-2"):
        load_models(path, "cpu", compare_pretrained=True)


def test_missing_model_is_an_error_before_any_server(tmp_path):
    port = free_port()
    missing = tmp_path / "missing.pth"
    result = subprocess.run([sys.executable, "-m", "instructkit.web_chat", str(missing), "--port",
                             str(port)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert f"error: The model file {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and "Running on" not in result.stdout


def test_the_command_serves_on_loopback(tmp_path):
    """`python -m instructkit.web_chat MODEL.pth --port N`: the one command a reader runs."""
    import urllib.request

    torch.manual_seed(1)
    path = save_model(tmp_path, "tiny", GPTModel(TEST_MODE_CONFIG))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "instructkit.web_chat", str(path), "--port",
                                str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "Chat at" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
        assert line.strip() == f"Chat at http://127.0.0.1:{port}/ (Ctrl-C stops the server)"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200 and b"gradio" in response.read().lower()
    finally:
        process.terminate()
        process.wait(timeout=30)
