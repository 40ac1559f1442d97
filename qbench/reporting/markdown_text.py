"""Text that came from a submission, made safe to place in a generated Markdown table cell.

``leaderboard/README.md`` is rendered by GitHub, so a string taken from a submission could otherwise open an
HTML tag (``<img src=...>``, ``<script>``), a link (``[click](https://...)``), an image, a code span, emphasis,
an entity (``&lt;``) or a new table cell (``|``), or end the row (a line break). :func:`markdown_cell` escapes
every such character; the result renders as the literal text and stays inside its cell.
"""

from __future__ import annotations

MARKDOWN_PUNCTUATION = frozenset("\\`*_{}[]|~")
"""Characters GitHub-flavoured Markdown may treat as syntax inside a table cell (code spans, emphasis, links and
images, cell breaks, strike-through); escaped with a backslash. Parentheses, ``!``, ``#`` and ``+`` need no escape
there: without ``[``/``]`` there is no link or image, and a cell never starts a line (no heading or list)."""
HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
"""Characters that could start HTML or an entity; replaced by their entities (rendered as the literal character)."""
MAX_CELL_CHARS = 200
"""Longest cell text; anything longer is cut and marked with an ellipsis."""


def markdown_cell(value: object) -> str:
    """``value`` as one escaped line for a Markdown table cell: whitespace runs (line breaks included) become one
    space, control characters are dropped, HTML-significant characters become entities and Markdown punctuation
    is backslash-escaped; at most :data:`MAX_CELL_CHARS` characters of the original text are kept."""
    text = " ".join(str(value).split())
    text = "".join(char for char in text if char.isprintable())
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 1] + "…"
    out = []
    for char in text:
        if char in HTML_ENTITIES:
            out.append(HTML_ENTITIES[char])
        elif char in MARKDOWN_PUNCTUATION:
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)
