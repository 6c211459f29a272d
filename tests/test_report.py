"""The run report's text, loss-curve image and eval table (no Prefect, no model)."""
from __future__ import annotations

import base64
import math
import xml.etree.ElementTree as ET

from cortexcraft.config import build_config
from cortexcraft.report import bits, eval_rows, loss_curve_svg, render_report, svg_data_uri

HISTORY = [
    {"step": 0, "train_loss": 4.17, "val_loss": 4.18, "lr": 1e-3, "tokens_seen": 0, "elapsed_seconds": 1.0},
    {"step": 100, "train_loss": 2.50, "val_loss": 2.60, "lr": 1e-3, "tokens_seen": 3200, "elapsed_seconds": 9.5},
    {"step": 200, "train_loss": 2.00, "val_loss": 2.20, "lr": 5e-4, "tokens_seen": 6400, "elapsed_seconds": 18.25},
]
SUMMARY = {"tokens_seen": 6400, "wall_seconds": 20.5, "params": 123456}


def render(**changes):
    values = dict(config=build_config("cpu"), summary=SUMMARY, history=HISTORY,
                  samples=[("ROMEO:", "Is this a dagger"), ("\n", "```not a fence```")],
                  parameters=123456, vocab_size=65, run_dir="/runs/abc", checkpoint="/runs/abc/checkpoints/step_00000200")
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
    assert '**Prompt** `"ROMEO:"`' in text and "Is this a dagger" in text
    assert '"n_layer": 4' in text


def test_sample_with_backticks_cannot_close_its_fence():
    text = render()
    assert "````text\n```not a fence```\n````" in text


def test_continued_run_is_visible():
    assert "continued from step 1,500 to step 2,000" in render(continued={"from_step": 1500, "to_step": 2000})
    assert "trained from scratch" in render(continued={"from_step": 0, "to_step": 1500})


def test_bpe_reports_bits_per_token():
    assert "bits/token" in render(config=build_config("cpu", ["tokenizer=bpe", "vocab_size=512"]))


def test_eval_rows_add_bits_and_keep_steps():
    rows = eval_rows(HISTORY)
    assert [r["step"] for r in rows] == [0, 100, 200]
    assert rows[-1]["val_bits_per_token"] == round(bits(2.2), 4)
