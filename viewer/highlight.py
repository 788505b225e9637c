"""Gold answers marked where they occur in a text, HTML-escaped."""

import re
from collections.abc import Iterable

from markupsafe import Markup, escape


def highlight(text: str | None, needles: Iterable[str]) -> Markup:
    """``text`` escaped for HTML, each case-insensitive occurrence of a needle wrapped in ``<mark>``.

    Longer needles win where two overlap (``William Shakespeare`` before ``Shakespeare``).

    >>> str(highlight("Rome & rome", ["Rome"]))
    '<mark>Rome</mark> &amp; <mark>rome</mark>'
    """
    if not text:
        return Markup("")
    words = sorted({needle.strip() for needle in needles if needle.strip()}, key=len, reverse=True)
    if not words:
        return escape(text)
    pattern = re.compile("|".join(re.escape(word) for word in words), re.IGNORECASE)
    pieces: list[str] = []
    start = 0
    for found in pattern.finditer(text):
        pieces.append(str(escape(text[start : found.start()])))
        pieces.append(f"<mark>{escape(found.group(0))}</mark>")
        start = found.end()
    pieces.append(str(escape(text[start:])))
    return Markup("".join(pieces))
