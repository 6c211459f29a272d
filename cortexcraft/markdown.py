"""Text shown verbatim in markdown (reports, model cards, Prefect artifacts): corpus text, vocabulary
previews and generated samples may hold backticks, pipes and HTML, which must never change the
document around them."""
from __future__ import annotations

import re


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)


def fence(text: str) -> str:
    """A fenced code block showing ``text`` verbatim. Markdown and HTML inside a code block are
    shown as text, and the fence is longer than any backtick run in it, so nothing closes it early."""
    ticks = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def code_span(text: str, in_table: bool = False) -> str:
    """An inline code span showing one line of ``text`` verbatim (CommonMark: delimited by a
    backtick run longer than any inside, padded with spaces when the text starts or ends with a
    backtick). A line break would end a table row or a heading, so it is shown as ``\\n``; in a
    table cell a ``|`` would still end the cell unless escaped."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    ticks = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    span = f"{ticks}{pad}{text}{pad}{ticks}"
    return span.replace("|", "\\|") if in_table else span
