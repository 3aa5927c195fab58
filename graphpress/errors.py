"""Turning long error texts into the one line a user reads."""

from __future__ import annotations

import re

MAX_CHARS = 600
# where torch's messages turn from the cause to debugging advice, stack dumps and log settings
_NOISE = re.compile(r"^(For more information|For C\+\+ stack trace|The following call raised|To fix the error|"
                    r"Set TORCH_|For extended logs|Caused by|User Stack|Potential framework code|"
                    r"\(Refer to|Traceback|Exception raised from|While executing)", re.IGNORECASE)


def one_line(text: object, limit: int = MAX_CHARS) -> str:
    """The non-empty lines of ``text`` joined by spaces (a cause is often on the second line), up to where
    torch's debugging advice starts, collapsed, without ANSI colour codes, cut at ``limit`` characters."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    lines = []
    for part in s.splitlines():
        if lines and _NOISE.match(part.strip()):
            break
        if part.strip():
            lines.append(part.strip())
    s = " ".join(lines)
    s = re.sub(r"\s+", " ", s).strip()
    return s if len(s) <= limit else s[: limit - 1].rstrip() + "…"


def describe(x: object) -> str:
    """A short description of a value for a message: its type, and its length or shape where it has one."""
    shape = getattr(x, "shape", None)
    if shape is not None:
        return f"{type(x).__name__} of shape {tuple(shape)}"
    if isinstance(x, (tuple, list, dict)):
        return f"{type(x).__name__} of {len(x)} items"
    return f"a {type(x).__name__}" if not isinstance(x, type) else f"the class {x.__name__}"
