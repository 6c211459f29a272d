"""Hostile text (slow): a model trained on a corpus full of HTML, markdown links and images,
code fences and very long lines, prompted with such text, writes a report that the Prefect UI
shows as plain text. Checked in headless Chromium on a real server: no injected element, no
dialog, every sample readable in its own code block."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from markdown_it import MarkdownIt

from cortexcraft.tokenizer import load_tokenizer
from flows.params import PipelineParams
from flows.prepare import prepare
from prefect_server import (CHROMIUM, CHROMIUM_ARGS, REPO, open_report_artifact, prefect_server, report_artifact,
                            require_chromium)

pytestmark = pytest.mark.slow

HOSTILE_LINES = [
    "<script>window.injected = 'script'</script>",
    "<img src=x onerror=\"window.injected = 'img'\">",
    "[click here](https://evil.example/) and ![tracker](https://evil.example/pixel.png)",
    "```",
    "# a heading outside the fence",
    "`````` <b>bold?</b> ``",
    "| a | table | row |",
]
PROMPTS = ["<script>", "![tracker](https://evil.example/pixel.png)", "```\n# heading", "<i>very long line</i> " * 200]
TINY = ["n_layer=2", "n_head=2", "n_embd=64", "block_size=64", "batch_size=16", "max_iters=400", "lr=1e-2",
        "warmup_iters=0", "eval_interval=200", "eval_iters=2", "checkpoint_interval=200", "max_new_tokens=300",
        "temperature=0.5",
        "device=cpu", f"prompts={json.dumps(PROMPTS)}"]


def hostile_corpus(repeats: int = 300) -> str:
    long_line = " ".join(["<i>very long line</i>"] * 400)  # ~8,800 characters
    return "".join("\n".join(HOSTILE_LINES[i % len(HOSTILE_LINES):] + HOSTILE_LINES[:i % len(HOSTILE_LINES)]) + "\n"
                   + (long_line + "\n" if i % 10 == 0 else "") for i in range(repeats))


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    corpus = tmp / "corpus.txt"
    corpus.write_text(hostile_corpus(), encoding="utf-8")
    with prefect_server(tmp / "prefect-home", tmp / "server.log") as env:
        api = env["PREFECT_API_URL"]
        result = subprocess.run([sys.executable, "-m", "flows", "pipeline", "--source", str(corpus),
                                 "--data-dir", str(tmp / "data"), *[a for s in TINY for a in ("--set", s)]],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        (run,) = httpx.post(f"{api}/flow_runs/filter", timeout=5).json()
        assert run["state_type"] == "COMPLETED"
        report = report_artifact(api, run["id"])
        report_file = result.stdout.splitlines()[0]
        yield {"ui": api.removesuffix("/api"), "run": run, "report": report, "tmp": tmp,
               "markdown": open(report_file, encoding="utf-8").read()}


def samples_of(markdown: str) -> list[str]:
    return [t.content.removesuffix("\n") for t in MarkdownIt("commonmark").parse(markdown)
            if t.type == "fence" and t.info == "text"][:len(PROMPTS)]


def test_the_samples_really_are_hostile(hostile_report):
    samples = samples_of(hostile_report["markdown"])
    assert len(samples) == len(PROMPTS)
    assert hostile_report["report"]["data"] == hostile_report["markdown"]
    text = "".join(samples)
    for hostile in ("<script>", "onerror=", "](https://evil.example/", "```"):
        assert hostile in text, samples


def test_the_report_page_in_chromium_has_no_injected_element_and_shows_every_sample(hostile_report):
    require_chromium()
    from playwright.sync_api import sync_playwright

    samples = samples_of(hostile_report["markdown"])
    dialogs, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("request", lambda request: requests.append(request.url))
        open_report_artifact(page, hostile_report["ui"], hostile_report["run"]["id"], hostile_report["report"])
        page.locator('img[src^="data:image/"]').wait_for(state="visible")
        found = page.evaluate("""() => ({
            injected: window.injected || null,
            images: [...document.querySelectorAll('img')].map(i => i.getAttribute('src').slice(0, 30)),
            handlers: [...document.querySelectorAll('*')]
                .filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
            evilLinks: [...document.querySelectorAll('a')].filter(a => (a.href || '').includes('evil.example')).length,
            boldTags: document.querySelectorAll('b').length,
            codeBlocks: [...document.querySelectorAll('pre')].map(p => p.innerText),
            text: document.body.innerText,
            pageWidth: document.scrollingElement.scrollWidth,
        })""")
        page.locator("pre").first.scroll_into_view_if_needed()
        page.screenshot(path=str(hostile_report["tmp"] / "hostile-report.png"))
        browser.close()

    assert found["injected"] is None and dialogs == []
    assert found["images"] == ["data:image/svg+xml;base64,PHN2"]  # the loss curve, nothing else
    assert found["handlers"] == 0 and found["evilLinks"] == 0 and found["boldTags"] == 0
    assert not [url for url in requests if "evil.example" in url]
    # One code block per sample plus the config: no fence was closed early, and each sample reads
    # back exactly (the UI may drop the trailing newline of a block).
    assert len(found["codeBlocks"]) == len(PROMPTS) + 1
    for shown, sample in zip(found["codeBlocks"], samples):
        assert shown.rstrip("\n") == sample.rstrip("\n")
    for prompt in PROMPTS:
        assert json.dumps(prompt) in found["text"]
    # The very long prompt line wraps or scrolls inside its block; the page does not grow sideways.
    assert found["pageWidth"] <= 1400


def table_cells(markdown: str) -> dict[str, list]:
    """{first cell's text: the inline tokens of the row's other cells} of every table row."""
    rows, row = {}, None
    for token in MarkdownIt("commonmark").enable("table").parse(markdown):
        if token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token)
        elif token.type == "tr_close":
            rows[row[0].content] = row[1:]
            row = None
    return rows


def code_spans(cells: list) -> list[str]:
    """The text of each cell's code spans; anything else in a cell (a span broken open) is kept as is."""
    return [
        child.content if child.type == "code_inline" else f"<{child.type} {child.content!r}>"
        for cell in cells
        for child in cell.children
        if child.content.strip(", ")
    ]


def test_the_corpus_and_vocabulary_artifacts_show_hostile_paths_and_the_preview_verbatim(
    tmp_path, temporary_prefect_server
):
    from prefect.client.orchestration import get_client

    source = tmp_path / "src `|` ``x``" / "corpus | `a`.txt"
    source.parent.mkdir()
    source.write_text(hostile_corpus(20), encoding="utf-8")
    data_dir = tmp_path / "data `|` dir"
    records = prepare(PipelineParams(source=str(source), data_dir=str(data_dir)))
    with get_client(sync_client=True) as client:
        markdown = {a.key.split("-")[0]: a.data for a in client.read_artifacts() if a.type == "markdown"}

    corpus = table_cells(markdown["corpus"])
    assert code_spans(corpus["source"]) == [str(source)]
    assert code_spans(corpus["files"]) == list(records["download"]["files"])
    vocab_dir = data_dir.resolve() / records["vocab"]["dir"]
    assert code_spans(table_cells(markdown["vocab"])["directory"]) == [str(vocab_dir)]
    preview = load_tokenizer(vocab_dir).preview()
    assert "`" in preview and "|" in preview
    fences = [t.content for t in MarkdownIt("commonmark").parse(markdown["vocab"]) if t.type == "fence"]
    assert fences == [preview + "\n"]
