"""Hypothesis strategies for fuzzing parsers of JSON documents: a valid document with one to
three values replaced by arbitrary JSON (or removed), shared by the checkpoint-index and the
generation-state fuzz tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from hypothesis import strategies as st


def json_values(nan: bool = False) -> st.SearchStrategy:
    """Arbitrary JSON values (`nan`: NaN and infinities too, which Python's json reads and writes)."""
    return st.recursive(
        st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
        | st.floats(allow_nan=nan, allow_infinity=nan or None) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=8,
    )


def paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key/index path in a JSON document, the root (empty path) first."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def mutated(make_doc: Callable[[], Any], values: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """Documents from make_doc() with 1-3 values at random paths replaced by `values` (default:
    json_values()) or removed."""
    values = json_values() if values is None else values
    all_paths = [p for p in paths(make_doc()) if p]

    @st.composite
    def strategy(draw: Any) -> Any:
        doc = make_doc()
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(all_paths))
            node = doc
            try:
                for k in path[:-1]:
                    node = node[k]
                if draw(st.booleans()) and isinstance(node, dict):
                    node.pop(path[-1], None)
                else:
                    node[path[-1]] = draw(values)
            except (KeyError, IndexError, TypeError):
                continue
        return doc

    return strategy()
