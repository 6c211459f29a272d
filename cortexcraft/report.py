"""The run report: markdown with samples, metrics and the loss curve as an embedded SVG image.

Pure functions of a run's eval history and summary, so the Prefect report task, the report file
and tests all render the same text. The curve is a data:image/svg+xml;base64 URI because UIs that
render markdown (Prefect's included) strip inline <svg>.
"""
from __future__ import annotations

import base64
import json
import math
import os
from typing import Any, Iterable

from cortexcraft.config import RunConfig
from cortexcraft.markdown import code_span, fence


def bits(loss: float | None) -> float | None:
    """Cross-entropy in nats per token -> bits per token (bits per char for a char tokenizer)."""
    return None if loss is None else loss / math.log(2)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def eval_rows(history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation, for a table artifact."""
    return [{
        "step": r["step"],
        "train_loss": round(r["train_loss"], 4) if r.get("train_loss") is not None else None,
        "val_loss": round(r["val_loss"], 4) if r.get("val_loss") is not None else None,
        "val_bits_per_token": round(bits(r["val_loss"]), 4) if r.get("val_loss") is not None else None,
        "lr": r.get("lr"),
        "tokens_seen": r.get("tokens_seen"),
        "elapsed_seconds": round(r["elapsed_seconds"], 1) if r.get("elapsed_seconds") is not None else None,
    } for r in history]


def loss_curve_svg(history: list[dict[str, Any]], width: int = 640, height: int = 300,
                   x_name: str = "step", marked: Iterable[float] = ()) -> str:
    """Train and val loss against step (or any ``x_name``), as a standalone SVG document; points
    whose x is in ``marked`` get a ring."""
    left, right, top, bottom = 56, 16, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    series = {name: [(r[x_name], r[name]) for r in history if r.get(name) is not None]
              for name in ("train_loss", "val_loss")}
    marked = set(marked)
    points = [p for s in series.values() for p in s]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no evaluations yet</text></svg>')
        return "".join(parts)
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1e-3)
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * plot_h

    # Steps get five evenly spaced ticks; other x values (versions) a tick each.
    x_ticks = [x_lo + (x_hi - x_lo) * i / 4 for i in range(5)] if x_name == "step" else sorted({p[0] for p in points})
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for x in x_ticks:
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{x:,.0f}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
                 f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{x_name}</text>'
                 f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">loss (nats/token)</text>')
    colours = {"train_loss": "#1f77b4", "val_loss": "#d62728"}
    for n, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colours[name]}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colours[name]}"/>' for x, y in pts)
        parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="7" fill="none" stroke="#2ca02c" stroke-width="2"/>'
                     for x, y in pts if x in marked)
        lx, ly = left + plot_w - 110, top + 16 + 16 * n
        parts.append(
            f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colours[name]}" stroke-width="2"/>'
            f'<text x="{lx + 24}" y="{ly}">{name.replace("_", " ")}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def model_history_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    """Val loss per version of a registered model (``cortexcraft.registry.history_rows``), promoted
    versions ringed, and the decisions."""
    points = [{"version": int(r["version"][1:]), "val_loss": r["val_loss"]} for r in rows]
    promoted = [int(r["version"][1:]) for r in rows if r["promoted"]]
    chart = loss_curve_svg(points, x_name="version", marked=promoted)
    lines = [
        f"# Model {code_span(name)}: val loss per version",
        "",
        f"![val loss per version]({svg_data_uri(chart)})",
        "",
        "Ringed: promoted to champion when registered. Val loss is each version's, on its own val split.",
        "",
        "| version | policy | steps | val loss | decision |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['version']}{' (champion)' if r['champion'] else ''} | {r['policy']} | {r['steps']:,} | "
        f"{r['val_loss']:.4f} | {r['decision'] or '–'} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def champion_card_markdown(record: dict[str, Any], version_dir: str | os.PathLike, prompt: str, sample: str) -> str:
    """The card of a registry version (``version.json``) that has just become champion."""
    decision = record.get("decision") or {}
    bits_text = (
        f"{record['bits_per_char']:.4f} bits/char"
        if record["bits_per_char"] is not None
        else f"{record['bits_per_token']:.4f} bits/token"
    )
    return "\n".join(
        [
            f"# Champion of {code_span(record['name'])}: {record['version']}",
            "",
            "| | |",
            "|---|---|",
            f"| decision | {decision.get('message', 'promoted by hand')} |",
            f"| policy | {record['policy']['reason']} |",
            f"| steps | {record['step']:,} |",
            f"| val loss | {record['val_loss']:.4f} ({bits_text}) |",
            f"| data | {code_span(record['data']['source'], in_table=True)}, "
            f"{record['data'].get('revision_text') or 'revision not recorded'} |",
            f"| directory | {code_span(str(version_dir), in_table=True)} |",
            "",
            f"**Sample** (prompt {code_span(json.dumps(prompt, ensure_ascii=False))})",
            "",
            fence(sample),
            "",
        ]
    )


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _best(history: list[dict[str, Any]], name: str) -> float | None:
    values = [r[name] for r in history if r.get(name) is not None]
    return min(values) if values else None


def render_report(
    *,
    config: RunConfig,
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    samples: list[tuple[str, int, str]],
    parameters: int,
    vocab_size: int,
    run_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    model: dict[str, Any] | None = None,
) -> str:
    """The report as markdown: the registry's verdict, training outcome, loss curve, samples, config.

    Every text that comes from the corpus, the model or the user (samples, prompts, paths, the
    config, model names, the source) is in a code block or code span, so no markdown or HTML in it
    is interpreted."""
    unit = "char" if config.tokenizer_kind == "char" else "token"
    final = history[-1] if history else {}
    best_train, best_val = _best(history, "train_loss"), _best(history, "val_loss")
    lines = [f"# CortexCraft run report: {code_span(config.preset)}", ""]
    if model:
        policy = model["policy"]
        start = (
            f" from {policy['parent']} (step {policy['init_step']:,} to {model['step']:,})" if policy["parent"] else ""
        )
        lines += [
            f"**Model:** {code_span(model['name'])} {model['version']}, {policy['mode']}{start}; "
            f"{model['decision']['message']}.",
            "",
            f"**Retraining policy:** {policy['reason']}.",
            "",
            f"**Data:** {code_span(model['source'])}, revision {model['revision'] or 'not recorded'}.",
            "",
        ]
    lines += [
        "| | |",
        "|---|---|",
        f"| parameters | {parameters:,} |",
        f"| vocab size | {vocab_size:,} ({config.tokenizer_kind}) |",
        f"| steps | {final.get('step', 0):,} |",
        f"| tokens seen | {summary.get('tokens_seen', final.get('tokens_seen', 0)):,} |",
        f"| wall time | {summary.get('wall_seconds', 0.0):.1f} s |",
        f"| best train loss | {_fmt(best_train)} ({_fmt(bits(best_train))} bits/{unit}) |",
        f"| best val loss | {_fmt(best_val)} ({_fmt(bits(best_val))} bits/{unit}) |",
        f"| final train loss | {_fmt(final.get('train_loss'))} ({_fmt(bits(final.get('train_loss')))} bits/{unit}) |",
        f"| final val loss | {_fmt(final.get('val_loss'))} ({_fmt(bits(final.get('val_loss')))} bits/{unit}) |",
        f"| checkpoint | {code_span(str(checkpoint), in_table=True)} |",
        f"| run directory | {code_span(str(run_dir), in_table=True)} |",
        "",
        "## Loss curve",
        "",
        f"![loss curve]({svg_data_uri(loss_curve_svg(history))})",
        "",
        "## Samples",
        "",
        f"temperature {config.sample.temperature}, top_k {config.sample.top_k}, top_p {config.sample.top_p}, "
        f"{config.sample.max_new_tokens} new tokens, seed {config.sample.seed} + prompt index",
        "",
    ]
    for prompt, seed, text in samples:
        # json.dumps keeps the prompt on one line and shows its newlines as \n.
        lines += [f"**Prompt** {code_span(json.dumps(prompt, ensure_ascii=False))} (seed {seed})", "", fence(text), ""]
    lines += ["## Config", "", fence(json.dumps(config.model_dump(mode="json"), indent=2)), ""]
    return "\n".join(lines)
