"""Position rules: which real tokens of a call a patch or a capture covers, as a ``(start, stop)`` slice.

Rules count the call's *real* tokens (padding excluded), like a Python slice:
``"all"``, ``"last"``, ``("last", w)`` (the last ``w`` tokens), ``(start, stop)``
(negative counts from the end; ``stop`` None runs to the end). The command line
writes them ``all``, ``last``, ``last:16``, ``3:7``.
"""

from __future__ import annotations

from typing import Union

from mtijax.errors import MtijaxError

END = 2**30
"""``stop`` of a position range that runs to the end of the call."""
PositionRule = Union[str, tuple]


def parse_positions(rule: PositionRule) -> tuple[int, int]:
    """A position rule (``"all"``, ``"last"``, ``("last", w)``, ``(start, stop)``, or the CLI's ``"last:16"`` and
    ``"3:7"``) as a ``(start, stop)`` slice over the call's real tokens."""
    if isinstance(rule, str):
        if rule == "all":
            return 0, END
        if rule == "last":
            return -1, END
        if rule.startswith("last:"):
            rule = ("last", rule[5:])
        elif ":" in rule:
            start, stop = rule.split(":", 1)
            rule = (start or 0, stop or None)
    if isinstance(rule, tuple) and len(rule) == 2 and rule[0] == "last":
        try:
            width = int(rule[1])
        except ValueError:
            width = 0
        if width < 1:
            raise MtijaxError(f"position rule {rule!r}: the window must be a positive integer")
        return -width, END
    if isinstance(rule, tuple) and len(rule) == 2:
        try:
            start = int(rule[0])
            stop = END if rule[1] is None else int(rule[1])
        except (TypeError, ValueError):
            raise MtijaxError(f"position rule {rule!r}: start and stop must be integers") from None
        if start >= 0 and 0 <= stop <= start:
            raise MtijaxError(f"position rule {rule!r} is empty")
        return start, stop
    raise MtijaxError(f"unknown position rule {rule!r}: use all, last, ('last', w) or (start, stop)")


def span_bounds(span: tuple[int, int], length: int) -> tuple[int, int]:
    """The token range ``[lo, hi)`` a span covers in a call of ``length`` real tokens (unclipped)."""
    start, stop = span
    lo = length + start if start < 0 else start
    hi = length if stop == END else length + stop if stop < 0 else stop
    return lo, hi
