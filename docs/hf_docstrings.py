"""A Griffe extension for this site: HF-style "Args:" types render as plain types in the reference tables.

The docstrings follow transformers' convention, `name (`float`, defaults to 0.1):` or `name (`int`, *optional*):`.
Griffe's Google parser would show that whole parenthesis, backticks and all, as the type, beside a Default column
that already gives the default. This extension rewrites each such type to the bare type (`float`, `int`) before the
docstring is parsed; the source keeps its convention.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ARG = re.compile(r"^(?P<indent>\s+)(?P<name>\*{0,2}\w+) \((?P<type>[^()]*(?:\([^()]*\)[^()]*)*)\):", re.M)


def plain_type(text: str) -> str:
    """`float`, defaults to 0.1 → float; `int`, *optional* → int | None."""
    head, _, rest = text.partition(",")
    kind = head.strip().strip("`").strip()
    optional = "*optional*" in rest
    return f"{kind} | None" if optional and "None" not in kind else kind


class HFDocstrings(griffe.Extension):
    """Rewrite the types of every "Args:" entry of every docstring to plain types."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ARG.sub(
                lambda m: f"{m['indent']}{m['name']} ({plain_type(m['type'])}):", obj.docstring.value
            )
