"""Plots of predictions and evaluations: confusion matrix, per-class F1, and scores on the ontology tree.

Every function follows scanpy's conventions: it draws into ``ax`` (a new figure when ``None``), returns the
:class:`~matplotlib.axes.Axes`, shows the figure when ``show`` is true (default: only with an interactive backend)
and writes it to ``save`` when given.
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from schce._io import write_file_atomically

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

    from schce.evaluation import EvaluationResult
    from schce.hierarchy import Hierarchy

logger = logging.getLogger(__name__)

__all__ = ["confusion_matrix", "confusion_table", "hierarchy_scores", "per_class_f1"]

_NORMALIZE = ("true", "pred", "all", None)


# ---------------------------------------------------------------------------------------------------- helpers
def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def _interactive_backend() -> bool:
    import matplotlib

    backend = str(matplotlib.get_backend()).lower()
    try:
        from matplotlib.backends import BackendFilter, backend_registry

        non_interactive = set(backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE))
    except ImportError:  # matplotlib < 3.9
        non_interactive = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}
    return backend not in non_interactive


def _save_figure(fig, save: str | os.PathLike) -> Path:
    fmt = Path(save).suffix.lstrip(".").lower() or None
    path = write_file_atomically(save, lambda tmp: fig.savefig(tmp, format=fmt, bbox_inches="tight", dpi=150))
    logger.info("Saved figure to %s.", path)
    return path


def _finish(ax: Axes, show: bool | None, save: str | os.PathLike | None) -> Axes:
    """Save and/or show the figure of ``ax``; return ``ax``."""
    fig = ax.get_figure()
    if save is not None:
        _save_figure(fig, save)
    if show is None:
        show = _interactive_backend()
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(str(text), width=width, break_on_hyphens=False)) or str(text)


def _namer(result: EvaluationResult) -> Callable[[str], str]:
    """Term ID -> display name, from the result's hierarchy and tables."""
    names: dict[str, str] = {}
    if result.per_class is not None and "name" in result.per_class.columns:
        names.update({str(k): str(v) for k, v in result.per_class["name"].items()})
    det = result.detailed
    if det is not None and "predicted_name" in det.columns:
        names.update(dict(zip(det["predicted"].astype(str), det["predicted_name"].astype(str), strict=True)))
    h = result.hierarchy
    if h is not None:
        names.update({t: h.name(t) for t in h.terms})
    return lambda t: names.get(t, t)


def _term_order(result: EvaluationResult, terms: Iterable[str]) -> list[str]:
    """``terms`` ordered by the hierarchy's labels, then its other terms, then the rest sorted."""
    h = result.hierarchy
    rank = {t: i for i, t in enumerate(h.terms)} if h is not None else {}
    return sorted(set(terms), key=lambda t: (rank.get(t, len(rank)), t))


# ---------------------------------------------------------------------------------------------------- confusion
def confusion_table(result: EvaluationResult, corrected: bool = True, normalize: str | None = "true") -> pd.DataFrame:
    """The confusion matrix of an evaluation, as a table.

    Only scorable cells count (``result.detailed.status != "not_scorable"``); each is placed at its effective truth
    (finer true labels mapped to their nearest model label).

    Parameters
    ----------
    result
        From :meth:`schce.HCEClassifier.evaluate` or :func:`schce.evaluation.evaluate_predictions`.
    corrected
        Use the hierarchy-corrected prediction (a descendant of the truth counts as the truth, scTab rule); else
        the predicted label as it is.
    normalize
        ``"true"``: fractions per row (recall on the diagonal); ``"pred"``: fractions per column (precision on the
        diagonal); ``"all"``: fractions of all scored cells; ``None``: cell counts. Empty rows / columns are 0.

    Returns
    -------
    Rows: effective true terms; columns: predicted terms together with the true terms (so every row has its
    diagonal cell). Both are CL IDs, ordered by the hierarchy's labels, then its other terms, then any remaining
    term. Index name ``"true"``, columns name ``"predicted"``.
    """
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}.")
    det = result.detailed
    if det is None:
        raise ValueError("This EvaluationResult has no `detailed` table; a confusion matrix needs per-cell results.")
    scored = det[det["status"].astype(str) != "not_scorable"]
    truth = scored["effective_true"].astype(str).to_numpy()
    pred = scored["corrected_prediction" if corrected else "predicted"].astype(str).to_numpy()
    rows = _term_order(result, truth)
    cols = _term_order(result, np.concatenate([truth, pred]))
    counts = pd.crosstab(pd.Categorical(truth, categories=rows), pd.Categorical(pred, categories=cols), dropna=False)
    counts = counts.reindex(index=rows, columns=cols, fill_value=0).astype(np.int64)
    if normalize is not None:
        c = counts.to_numpy(dtype=np.float64)
        axis = {"true": 1, "pred": 0, "all": None}[normalize]
        sums = np.broadcast_to(c.sum(axis=axis, keepdims=True), c.shape)
        table = pd.DataFrame(np.divide(c, sums, out=np.zeros(c.shape), where=sums > 0), index=rows, columns=cols)
    else:
        table = counts
    table.index.name, table.columns.name = "true", "predicted"
    return table


def confusion_matrix(
    result: EvaluationResult,
    corrected: bool = True,
    normalize: str | None = "true",
    use_names: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    cmap: str = "Blues",
) -> Axes:
    """Heatmap of the confusion matrix: effective true labels (rows) against predicted labels (columns).

    Parameters
    ----------
    result
        From :meth:`schce.HCEClassifier.evaluate` or :func:`schce.evaluation.evaluate_predictions`.
    corrected
        Hierarchy-corrected predictions (a descendant of the truth counts as correct) or exact ones.
    normalize
        ``"true"`` (row fractions), ``"pred"`` (column fractions), ``"all"`` or ``None`` (counts); see
        :func:`confusion_table`.
    use_names
        Label the axes with Cell Ontology names instead of IDs.
    ax
        Axes to draw into; default a new figure sized to the matrix.
    show
        Show the figure; default: only with an interactive matplotlib backend.
    save
        Write the figure to this path (format from the suffix); parent folders are created.
    cmap
        Matplotlib colormap.

    Returns
    -------
    The Axes. Cells are annotated with their values when the matrix is at most 20 × 20.
    """
    table = confusion_table(result, corrected=corrected, normalize=normalize)
    n_rows, n_cols = table.shape
    name = _namer(result) if use_names else str
    ax = _new_axes(ax, (max(4.5, 0.5 * n_cols + 3.5), max(3.5, 0.45 * n_rows + 2.0)))
    values = table.to_numpy(dtype=np.float64)
    vmax = 1.0 if normalize is not None else max(float(values.max(initial=0)), 1.0)
    im = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(n_cols), [name(t) for t in table.columns], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(n_rows), [name(t) for t in table.index])
    ax.tick_params(labelsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n_rows <= 20 and n_cols <= 20:
        fmt = "{:d}" if normalize is None else "{:.2f}"
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                text = fmt.format(int(v)) if normalize is None else fmt.format(v)
                color = "white" if v > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    label = {"true": "fraction of true label", "pred": "fraction of prediction", "all": "fraction of cells"}
    ax.get_figure().colorbar(im, ax=ax, label=label.get(normalize, "cells"), fraction=0.046, pad=0.04)
    kind = "hierarchy-corrected" if corrected else "exact"
    ax.set_title(f"Confusion matrix ({kind})")
    return _finish(ax, show, save)


# ---------------------------------------------------------------------------------------------------- per-class F1
def per_class_f1(
    result: EvaluationResult,
    corrected: bool = True,
    sort: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Horizontal bars of the per-class F1 score, labelled by Cell Ontology name, with the support at the bar end.

    Parameters
    ----------
    result
        From :meth:`schce.HCEClassifier.evaluate` or :func:`schce.evaluation.evaluate_predictions`.
    corrected
        Plot the hierarchy-corrected F1 (and the exact F1 beside it, lighter, for comparison); else the exact F1.
    sort
        Order classes by F1, best at the top; else in the table's order.
    ax
        Axes to draw into; default a new figure sized to the number of classes.
    show
        Show the figure; default: only with an interactive matplotlib backend.
    save
        Write the figure to this path (format from the suffix); parent folders are created.

    Returns
    -------
    The Axes: one bar per class (two when ``corrected``: the exact bar first, then the corrected ones).
    """
    table = result.per_class
    main = "corrected_f1" if corrected else "f1"
    if table is None or main not in table.columns:
        raise ValueError(f"result.per_class needs a {main!r} column.")
    table = table.copy()
    table["_f1"] = table[main].astype(np.float64).fillna(0.0)
    if sort:
        table = table.sort_values(["_f1", "support"], ascending=[False, False], kind="stable")
    n = len(table)
    names = table["name"].astype(str).tolist() if "name" in table.columns else [str(t) for t in table.index]
    ax = _new_axes(ax, (7.0, max(2.5, 0.38 * n + 1.2)))
    y = np.arange(n)[::-1].astype(np.float64)  # first row at the top
    f1_main = table["_f1"].to_numpy()
    if corrected:
        exact = table["f1"].astype(np.float64).fillna(0.0).to_numpy()
        h = 0.4
        ax.barh(y - h / 2, exact, height=h, color="#9ecae1", label="exact")
        ax.barh(y + h / 2, f1_main, height=h, color="#08519c", label="hierarchy-corrected")
        ends = np.maximum(exact, f1_main)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    else:
        ax.barh(y, f1_main, height=0.7, color="#08519c", label="exact")
        ends = f1_main
    support = table["support"].to_numpy() if "support" in table.columns else np.full(n, np.nan)
    for yi, end, s in zip(y, ends, support, strict=True):
        text = f"n={int(s)}" if np.isfinite(s) else ""
        ax.text(end + 0.01, yi, text, va="center", ha="left", fontsize=7, color="0.3")
    ax.set_yticks(y, names)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, 1.15)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("F1")
    ax.grid(axis="x", color="0.9", zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"Per-class F1 ({'hierarchy-corrected' if corrected else 'exact'})")
    return _finish(ax, show, save)


# ---------------------------------------------------------------------------------------------------- tree
def _layered_layout(nodes: Sequence[str], parents: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    """Positions of a DAG's nodes: ``y = -depth`` (longest path from a root), ``x`` by barycentre ordering."""
    depth: dict[str, int] = {}

    def visit(t: str, seen: frozenset = frozenset()) -> int:
        if t not in depth:
            depth[t] = 1 + max((visit(p, seen | {t}) for p in parents[t] if p not in seen), default=-1)
        return depth[t]

    for t in nodes:
        visit(t)
    children: dict[str, list[str]] = {t: [] for t in nodes}
    for t in nodes:
        for p in parents[t]:
            children[p].append(t)
    n_layers = max(depth.values(), default=-1) + 1
    layers: list[list[str]] = [sorted(t for t in nodes if depth[t] == d) for d in range(n_layers)]
    x: dict[str, float] = {}

    def place(layer: list[str], desired: dict[str, float]) -> None:
        # keep the order, at least 1 apart, as close to the desired positions as a shifted push gives
        pos, prev = [], -np.inf
        for t in layer:
            prev = max(desired[t], prev + 1.0)
            pos.append(prev)
        shift = np.mean([desired[t] for t in layer]) - np.mean(pos)
        for t, p in zip(layer, pos, strict=True):
            x[t] = p + shift

    def sweep(layer_ids: Iterable[int], neighbours: dict[str, list[str]]) -> None:
        for d in layer_ids:
            layer = layers[d]
            desired = {}
            for i, t in enumerate(layer):
                nb = [x[n] for n in neighbours[t] if n in x]
                desired[t] = float(np.mean(nb)) if nb else x.get(t, i - (len(layer) - 1) / 2)
            layer.sort(key=lambda t: (desired[t], t))
            place(layer, desired)

    for d, layer in enumerate(layers):  # initial: barycentre of the parents, roots centred
        if d == 0:
            place(layer, {t: i - (len(layer) - 1) / 2 for i, t in enumerate(layer)})
        else:
            sweep([d], parents)
    for _ in range(3):
        sweep(range(n_layers - 2, -1, -1), children)
        sweep(range(1, n_layers), parents)
    return {t: (x[t], -float(depth[t])) for t in nodes}


def hierarchy_scores(
    adata: AnnData,
    key_added: str = "schce",
    groupby: str | None = None,
    group: str | None = None,
    hierarchy: Hierarchy | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    cmap: str = "viridis",
    min_score: float = 0.0,
) -> Axes:
    """Mean subtree score of every term, drawn on the ontology tree of the model's labels and their ancestors.

    Reads ``adata.obsm[f"{key_added}_hierarchical_scores"]`` (written by :meth:`schce.HCEClassifier.predict`):
    for each term, the summed probability of the term and its descendant labels, averaged over all cells or over
    the cells of one group; sparse scores (``hierarchical_scores="sparse"``) count each left-out score as 0.

    Parameters
    ----------
    adata
        Annotated data after :meth:`schce.HCEClassifier.predict`.
    key_added
        The ``key_added`` used by ``predict``.
    groupby
        ``obs`` column to select cells by (with ``group``).
    group
        Value of ``groupby`` whose cells are averaged; default: all cells.
    hierarchy
        The model's :class:`~schce.Hierarchy` (e.g. ``model.hierarchy``), for edges and names; default: the edges
        among the scored terms from the embedded Cell Ontology.
    ax
        Axes to draw into; default a new figure sized to the tree.
    show
        Show the figure; default: only with an interactive matplotlib backend.
    save
        Write the figure to this path (format from the suffix); parent folders are created.
    cmap
        Colormap of the mean scores (fixed range 0 to 1).
    min_score
        Nodes with a mean score below this are drawn faded.

    The model's labels are drawn as large outlined nodes with bold names; terms that are only ontology ancestors
    (grouping terms such as "motile cell") as small nodes with grey italic names. The labels are
    ``hierarchy.labels``, else the columns of ``obsm[f"{key_added}_probabilities"]``.

    Returns
    -------
    The Axes. The nodes are the scatter collection labelled ``"terms"``, in the order of the obsm columns (its
    array holds the mean scores); edges are a line collection from parent (above) to child (below); node labels
    are the term names.

    Raises
    ------
    KeyError
        If the scores are missing (``predict`` has not been run with this ``key_added``).
    ValueError
        If ``groupby`` is not an ``obs`` column or ``group`` is not one of its values.
    """
    terms, values = _term_scores(adata, f"{key_added}_hierarchical_scores", key_added, hierarchy)
    mask = _group_mask(adata, groupby, group)
    mean = np.asarray(values[mask].mean(axis=0), dtype=np.float64).ravel()
    is_label, parents, names = _term_tree(terms, hierarchy, adata.obsm.get(f"{key_added}_probabilities"))
    pos = _layered_layout(terms, parents)
    xy = np.array([pos[t] for t in terms], dtype=np.float64).reshape(-1, 2)
    # geometry: one x unit ≈ 1.5 in (a wrapped label), one layer ≈ 0.9 in
    span_x = float(xy[:, 0].max() - xy[:, 0].min()) if len(terms) else 0.0
    n_layers = int(-xy[:, 1].min()) + 1 if len(terms) else 1
    ax = _new_axes(ax, (max(5.0, 1.5 * (span_x + 1) + 1.5), max(3.0, 0.9 * n_layers + 1.0)))
    segments = [[pos[p], pos[t]] for t in terms for p in parents[t]]
    _draw_tree(ax, xy, segments, [names[t] for t in terms], mean, is_label, cmap, min_score)
    where = f"{groupby} = {group}" if groupby is not None else "all cells"
    ax.set_title(f"Mean hierarchical score: {where} (n={int(mask.sum())})")
    return _finish(ax, show, save)


def _term_scores(adata: AnnData, key: str, key_added: str, hierarchy: Hierarchy | None):
    """The scored terms and the cells × terms subtree scores of ``adata.obsm[key]``."""
    if key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{key!r}] is missing: run `model.predict(adata, key_added={key_added!r})` first "
            f"(obsm holds: {sorted(adata.obsm.keys()) or 'nothing'})."
        )
    scores = adata.obsm[key]
    if isinstance(scores, pd.DataFrame):
        return [str(c) for c in scores.columns], scores.to_numpy(dtype=np.float64)
    info = adata.uns.get(key_added)
    stored_terms = info.get("terms") if isinstance(info, dict) else None
    if hasattr(scores, "tocsr") and stored_terms is not None and len(stored_terms) == scores.shape[1]:
        # hierarchical_scores="sparse": each cell's highest scores, columns named in uns; the mean counts the
        # left-out scores (each below the smallest kept one) as 0
        return [str(t) for t in stored_terms], scores.tocsr()
    values = np.asarray(scores, dtype=np.float64)
    if hierarchy is None or values.shape[1] != len(hierarchy.terms):
        raise ValueError(
            f"adata.obsm[{key!r}] is an array without term names: pass `hierarchy=model.hierarchy` "
            "(with one term per column)."
        )
    return list(hierarchy.terms), values


def _group_mask(adata: AnnData, groupby: str | None, group: str | None) -> np.ndarray:
    """The cells of ``group`` in ``obs[groupby]``; all cells when neither is given."""
    if groupby is None and group is None:
        return np.ones(adata.n_obs, dtype=bool)
    if groupby is None or group is None:
        raise ValueError("Pass both `groupby` and `group` (or neither, for all cells).")
    if groupby not in adata.obs.columns:
        raise ValueError(f"groupby={groupby!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
    col = adata.obs[groupby].astype(str).to_numpy()
    mask = col == str(group)
    if not mask.any():
        present = sorted(pd.unique(col))
        shown = ", ".join(map(repr, present[:20])) + (", …" if len(present) > 20 else "")
        raise ValueError(f"group={group!r} is not a value of adata.obs[{groupby!r}]; values: {shown}.")
    return mask


def _term_tree(terms: list[str], hierarchy: Hierarchy | None, probabilities):
    """Which terms are model labels, each term's parents among the terms, and the display names."""
    if hierarchy is not None:
        model_labels = set(hierarchy.labels)
    else:  # the labels are the columns of the probabilities; without them, every term is drawn alike
        model_labels = set(map(str, probabilities.columns)) if isinstance(probabilities, pd.DataFrame) else set(terms)
    is_label = np.array([t in model_labels for t in terms], dtype=bool)
    node_set = set(terms)
    if hierarchy is not None:
        parents = {t: [p for p in hierarchy.parents(t) if p in node_set] if t in hierarchy.terms else [] for t in terms}
        return is_label, parents, {t: hierarchy.name(t) if t in hierarchy.terms else t for t in terms}
    from schce.ontology import load_cell_ontology

    onto = load_cell_ontology()
    parents, names = {}, {}
    for t in terms:
        try:
            parents[t] = [p for p in onto.parents(t) if p in node_set]
        except KeyError:
            parents[t] = []
        try:
            names[t] = onto.name(t)
        except KeyError:
            names[t] = t
    return is_label, parents, names


def _draw_tree(ax: Axes, xy, segments, names: list[str], mean, is_label, cmap: str, min_score: float) -> None:
    """Edges, nodes coloured by mean score (labels large and outlined, grouping terms small), names, colour bar."""
    import matplotlib as mpl
    from matplotlib.collections import LineCollection

    ax.add_collection(LineCollection(segments, colors="0.65", linewidths=1.0, zorder=1))
    norm = mpl.colors.Normalize(vmin=0.0, vmax=1.0)
    faded = mean < min_score
    alpha = np.where(faded, 0.25, 1.0)
    # an opaque white underlay keeps the edges from showing through faded nodes
    size = np.where(is_label, 160.0, 55.0)
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c="white", edgecolors="none", zorder=1.5, label="_underlay")
    nodes = ax.scatter(
        xy[:, 0], xy[:, 1], c=mean, cmap=cmap, norm=norm, s=size, alpha=alpha, edgecolors="0.25",
        linewidths=np.where(is_label, 0.8, 0.3),
    )  # fmt: skip
    nodes.set_zorder(2)
    nodes.set_label("terms")
    for (x, y), name, f, lab in zip(xy, names, faded, is_label, strict=True):
        ax.text(
            x,
            y - 0.16,
            _wrap(name, 18),
            ha="center",
            va="top",
            fontsize=6.5 if lab else 5.5,
            fontweight="bold" if lab else "normal",
            fontstyle="normal" if lab else "italic",
            color="0.6" if f or not lab else "0.1",
            linespacing=1.0,
            zorder=3,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
        )
    sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    ax.get_figure().colorbar(sm, ax=ax, label="mean subtree score", fraction=0.03, pad=0.01, shrink=0.6)
    if len(xy):
        ax.set_xlim(xy[:, 0].min() - 0.6, xy[:, 0].max() + 0.6)
        ax.set_ylim(xy[:, 1].min() - 0.75, 0.35)
    ax.set_axis_off()
