"""CloudWatch Logs' JSON filter patterns, which moto does not know (it matches every event with them).

``{ $.event = "task.failed" }`` selects JSON events whose field ``event`` is that string; comparisons
(``=``, ``!=``; strings in quotes, ``*`` a wildcard in them, numbers, ``true``/``false``/``null``) join
with ``&&`` and ``||`` (``&&`` first; parentheses are not modelled). A pattern that is not JSON's is
left to moto. Pure; :func:`make_logs_like_aws` puts it into moto's filter.
"""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

COMPARISON_RE = re.compile(
    r'^\s*\$((?:\.[A-Za-z0-9_-]+)+)\s*(=|!=)\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|null)\s*$'
)


class PatternError(ValueError):
    pass


def is_json_pattern(pattern: str) -> bool:
    text = pattern.strip()
    return text.startswith("{") and text.endswith("}")


def parse(pattern: str) -> list[list[tuple[list[str], str, Any]]]:
    """A JSON pattern as alternatives (``||``) of conjunctions (``&&``) of (path, operator, value)."""
    body = pattern.strip()[1:-1]
    alternatives = []
    for alternative in body.split("||"):
        conjunction = []
        for part in alternative.split("&&"):
            match = COMPARISON_RE.match(part)
            if not match:
                raise PatternError(f"not a JSON filter comparison: {part.strip()!r}")
            path, operator, literal = match.groups()
            conjunction.append((path.lstrip(".").split("."), operator, json.loads(literal)))
        alternatives.append(conjunction)
    return alternatives


def field_of(document: Any, path: list[str]) -> tuple[bool, Any]:
    for name in path:
        if not isinstance(document, dict) or name not in document:
            return False, None
        document = document[name]
    return True, document


def equal(found: Any, wanted: Any) -> bool:
    if isinstance(wanted, str) and isinstance(found, str):
        return fnmatch.fnmatchcase(found, wanted) if "*" in wanted else found == wanted
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        return isinstance(found, (int, float)) and not isinstance(found, bool) and found == wanted
    return found is wanted or found == wanted


def matches(pattern: str, message: str) -> bool:
    """Whether the event ``message`` matches the JSON pattern (an event that is not JSON never does)."""
    try:
        document = json.loads(message)
    except ValueError:
        return False
    for conjunction in parse(pattern):
        ok = True
        for path, operator, wanted in conjunction:
            present, found = field_of(document, path)
            hit = present and equal(found, wanted)
            if (operator == "=" and not hit) or (operator == "!=" and (not present or hit)):
                ok = False
                break
        if ok:
            return True
    return False


def make_logs_like_aws() -> None:
    """Give moto's FilterLogEvents (and metric and subscription filters) AWS's JSON patterns."""
    from moto.logs import models

    original = models.EventMessageFilter
    if getattr(original, "ec2cluster_json_patterns", False):
        return

    class EventMessageFilter(original):  # type: ignore[misc, valid-type]
        ec2cluster_json_patterns = True

        def __init__(self, pattern: str) -> None:
            self.json_pattern = pattern if pattern and is_json_pattern(pattern) else None
            if self.json_pattern is not None:
                parse(self.json_pattern)  # AWS refuses a pattern it cannot parse
            super().__init__("" if self.json_pattern else pattern)

        def matches(self, message: str) -> bool:
            if self.json_pattern is not None:
                return matches(self.json_pattern, message)
            return super().matches(message)

    models.EventMessageFilter = EventMessageFilter
