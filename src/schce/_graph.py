"""Small graph helpers shared by the ontology and the hierarchy."""

from __future__ import annotations

from collections.abc import Mapping


class HierarchyCycleError(ValueError):
    """A hierarchy's edges contain a cycle, so it is not a partial order."""


def find_cycle(parents: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """Return one cycle of a child → parents mapping as ``[a, b, ..., a]`` (child before parent), or None for a DAG.

    Iterative depth-first search in sorted order, so the reported cycle is deterministic and deep hierarchies cannot
    hit Python's recursion limit.
    """
    done: set[str] = set()
    for start in sorted(parents):
        if start in done:
            continue
        path = [start]
        on_path = {start}
        stack = [iter(parents[start])]
        while stack:
            parent = next(stack[-1], None)
            if parent is None:
                stack.pop()
                node = path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            if parent in on_path:
                return path[path.index(parent) :] + [parent]
            if parent in done:
                continue
            path.append(parent)
            on_path.add(parent)
            stack.append(iter(parents.get(parent, ())))
    return None
