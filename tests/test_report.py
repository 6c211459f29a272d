"""The run report's text, loss-curve image and eval table (no Prefect, no model)."""
from __future__ import annotations

import base64
import json
import math
import xml.etree.ElementTree as ET

import pytest
from markdown_it import MarkdownIt

from cortexcraft.config import build_config
from cortexcraft.report import bits, eval_rows, loss_curve_svg, model_history_markdown, render_report, svg_data_uri

HISTORY = [
    {"step": 0, "train_loss": 4.17, "val_loss": 4.18, "lr": 1e-3, "tokens_seen": 0, "elapsed_seconds": 1.0},
    {"step": 100, "train_loss": 2.50, "val_loss": 2.60, "lr": 1e-3, "tokens_seen": 3200, "elapsed_seconds": 9.5},
    {"step": 200, "train_loss": 2.00, "val_loss": 2.20, "lr": 5e-4, "tokens_seen": 6400, "elapsed_seconds": 18.25},
]
SUMMARY = {"tokens_seen": 6400, "wall_seconds": 20.5, "params": 123456}


def render(**changes):
    values = dict(
        config=build_config("cpu"),
        summary=SUMMARY,
        history=HISTORY,
        samples=[("ROMEO:", 1337, "Is this a dagger"), ("\n", 1338, "```not a fence```")],
        parameters=123456,
        vocab_size=65,
        run_dir="/runs/abc",
        checkpoint="/runs/abc/checkpoints/step_00000200",
    )
    values.update(changes)
    return render_report(**values)


def test_svg_is_a_standalone_document_with_one_line_per_series():
    root = ET.fromstring(loss_curve_svg(HISTORY))
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 2
    assert all(len(line.get("points").split()) == len(HISTORY) for line in lines)


def test_svg_without_history_says_so():
    assert "no evaluations yet" in loss_curve_svg([])


def test_data_uri_round_trips():
    svg = loss_curve_svg(HISTORY)
    uri = svg_data_uri(svg)
    assert uri.startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).decode() == svg


def test_report_has_metrics_curve_samples_and_config():
    text = render()
    assert "| parameters | 123,456 |" in text
    assert "| tokens seen | 6,400 |" in text
    assert "| wall time | 20.5 s |" in text
    assert f"| best val loss | 2.2000 ({2.2 / math.log(2):.4f} bits/char) |" in text
    assert f"| final train loss | 2.0000 ({2.0 / math.log(2):.4f} bits/char) |" in text
    assert "![loss curve](data:image/svg+xml;base64," in text
    assert "<svg" not in text  # inline SVG is stripped by the Prefect UI
    assert '**Prompt** `"ROMEO:"` (seed 1337)' in text and "Is this a dagger" in text
    assert '**Prompt** `"\\n"` (seed 1338)' in text
    assert '"n_layer": 4' in text


def test_sample_with_backticks_cannot_close_its_fence():
    text = render()
    assert "````text\n```not a fence```\n````" in text


MODEL = {
    "name": "cpu",
    "version": "v3",
    "step": 2000,
    "source": "/data/input.txt",
    "revision": "content 0123456789abcdef (stat, 0 of 1 files hashed)",
    "policy": {
        "mode": "finetune",
        "parent": "v2",
        "init_step": 1500,
        "reason": "auto: finetune from champion v2 (step 1,500; data changed)",
    },
    "decision": {"message": "not promoted: val 1.7000 vs champion v2 1.6500"},
}


def test_registry_verdict_policy_and_data_revision_are_visible():
    text = render(model=MODEL)
    assert (
        "**Model:** `cpu` v3, finetune from v2 (step 1,500 to 2,000); not promoted: val 1.7000 vs champion v2 1.6500."
        in text
    )
    assert "**Retraining policy:** auto: finetune from champion v2 (step 1,500; data changed)." in text
    assert "**Data:** `/data/input.txt`, revision content 0123456789abcdef (stat, 0 of 1 files hashed)." in text
    fresh = dict(
        MODEL, policy={"mode": "fresh", "parent": None, "init_step": None, "reason": "fresh: trained from scratch"}
    )
    assert "**Model:** `cpu` v3, fresh; " in render(model=fresh)


def test_model_history_chart_rings_promoted_versions():
    rows = [
        {
            "version": "v1",
            "champion": False,
            "policy": "fresh",
            "steps": 40,
            "val_loss": 2.5,
            "promoted": True,
            "decision": "promoted v1: first version of m (val 2.5000)",
        },
        {
            "version": "v2",
            "champion": True,
            "policy": "finetune",
            "steps": 60,
            "val_loss": 2.1,
            "promoted": True,
            "decision": "promoted v2: val 2.1000 vs champion v1 2.4000",
        },
        {
            "version": "v3",
            "champion": False,
            "policy": "continue",
            "steps": 80,
            "val_loss": 3.0,
            "promoted": False,
            "decision": "not promoted: val 3.0000 vs champion v2 2.1000",
        },
    ]
    text = model_history_markdown("m", rows)
    svg = base64.b64decode(text.split("](data:image/svg+xml;base64,", 1)[1].split(")", 1)[0]).decode()
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    (line,) = root.findall(f"{ns}polyline")
    assert len(line.get("points").split()) == 3
    rings = [c for c in root.findall(f"{ns}circle") if c.get("fill") == "none"]
    assert len(rings) == 2  # v1 and v2 were promoted
    assert [t.text for t in root.findall(f"{ns}text") if t.text in ("1", "2", "3")] == ["1", "2", "3"]
    assert "| v2 (champion) | finetune | 60 | 2.1000 | promoted v2: val 2.1000 vs champion v1 2.4000 |" in text


def test_bpe_reports_bits_per_token():
    assert "bits/token" in render(config=build_config("cpu", ["tokenizer=bpe", "vocab_size=512"]))


def test_eval_rows_add_bits_and_keep_steps():
    rows = eval_rows(HISTORY)
    assert [r["step"] for r in rows] == [0, 100, 200]
    assert rows[-1]["val_bits_per_token"] == round(bits(2.2), 4)


# What a hostile corpus (or a model trained on one) can put in a sample or a prompt.
HOSTILE = [
    "<script>document.title='pwned'</script>",
    "<img src=x onerror=\"document.title='pwned'\">",
    "[click me](https://evil.example/) and ![tracker](https://evil.example/p.png)",
    "```\n# closed the fence early\n```",
    "`````` six ticks `` two ticks",
    "| a | table | row |",
    "x" * 20_000,
]


def rendered_html(markdown: str) -> str:
    # CommonMark plus GFM tables, with raw HTML and every link URL allowed: the most permissive
    # reading of the report.
    md = MarkdownIt("commonmark", {"html": True}).enable("table")
    md.validateLink = lambda url: True
    return md.render(markdown)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_samples_prompts_and_paths_render_as_text(hostile):
    markdown = render(
        samples=[(hostile, 1, hostile), ("`" + hostile, 2, hostile + "`")],
        run_dir=f"/runs/{hostile[:40]}|`x`",
        config=build_config("cpu", [f"source={hostile[:60]}"]),
    )
    html = rendered_html(markdown)
    assert "<script" not in html and "<a " not in html and "<h1>closed" not in html
    assert html.count("<img") == 1  # the loss curve only
    assert html.count("<h1>") == 1 and html.count("<table>") == 1


def test_fenced_samples_read_back_exactly():
    tokens = MarkdownIt("commonmark").parse(render(samples=[(h, i, h) for i, h in enumerate(HOSTILE)]))
    fences = [t.content for t in tokens if t.type == "fence" and t.info == "text"]
    assert fences[: len(HOSTILE)] == [h + "\n" for h in HOSTILE]


def test_inline_code_spans_read_back_exactly():
    prompt = "`` <b>x</b> `"
    tokens = MarkdownIt("commonmark").enable("table").parse(render(samples=[(prompt, 0, "")], run_dir="/r|u`n`s"))
    spans = [c.content for t in tokens if t.type == "inline" for c in t.children if c.type == "code_inline"]
    assert json.dumps(prompt) in spans
    assert "/r|u`n`s" in spans
