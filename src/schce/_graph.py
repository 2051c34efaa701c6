"""Graph helpers shared by the ontology and the hierarchy: cycles, ancestor closure, depths, partial-order checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


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


def validate_reachability(R: np.ndarray) -> None:
    """Check that ``R`` is a partial order: reflexive, antisymmetric and transitive.

    Raises
    ------
    ValueError
        Naming the first violating labels (by index).
    """
    R = np.asarray(R).astype(bool)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"A reachability matrix must be square, got shape {R.shape}.")
    if not R.diagonal().all():
        i = int(np.flatnonzero(~R.diagonal())[0])
        raise ValueError(f"Reachability is not reflexive: R[{i}, {i}] = 0.")
    sym = R & R.T
    np.fill_diagonal(sym, False)
    if sym.any():
        i, j = map(int, np.argwhere(sym)[0])
        raise HierarchyCycleError(f"Reachability is not antisymmetric (a cycle): labels {i} and {j} reach each other.")
    Ri = R.astype(np.int32)
    closure = (Ri @ Ri) > 0
    if (closure & ~R).any():
        i, j = map(int, np.argwhere(closure & ~R)[0])
        raise ValueError(
            f"Reachability is not transitive: label {i} reaches {j} through another label but R[{i}, {j}] = 0."
        )


def ancestor_sets(parents: Mapping[str, tuple[str, ...]], terms: Sequence[str]) -> dict[str, frozenset[str]]:
    """Every term's strict ancestors, from a child → parents mapping of a DAG."""
    memo: dict[str, frozenset[str]] = {}

    def visit(t: str) -> frozenset[str]:
        if t not in memo:
            acc: set[str] = set()
            for p in parents[t]:
                acc.add(p)
                acc |= visit(p)
            memo[t] = frozenset(acc)
        return memo[t]

    for t in terms:
        visit(t)
    return memo


def depths(parents: Mapping[str, tuple[str, ...]], terms: Sequence[str]) -> np.ndarray:
    """Longest path from a root, per term (roots have depth 0)."""
    memo: dict[str, int] = {}

    def visit(t: str) -> int:
        if t not in memo:
            memo[t] = 1 + max((visit(p) for p in parents[t]), default=-1)
        return memo[t]

    return np.array([visit(t) for t in terms], dtype=np.float64)
