"""Walking a deployment file's parsed YAML: what the compose and Kubernetes tests share.

Both check things that may sit anywhere in a file (a secret written in clear, a path
outside the repository), so they read every string value, however deep.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def strings(node: Any) -> Iterator[str]:
    """Every string value anywhere in a YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
