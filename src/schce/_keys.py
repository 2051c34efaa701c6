"""Which keys schce owns in an AnnData: the output names, the foreign-key rule, the record of what was written."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

logger = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_key_added(key_added) -> None:
    """Refuse a ``key_added`` that would give keys such as ``_prediction`` or ``X_``, or break h5ad paths."""
    if not isinstance(key_added, str) or not _KEY.fullmatch(key_added):
        raise ValueError(
            f"key_added must be a non-empty name of letters, digits, '_', '.' or '-' (starting with a letter or "
            f"digit), got {key_added!r}. The default is 'schce'."
        )


def output_keys(
    key_added: str,
    majority_voting: bool = False,
    over_clustering: str | None = None,
    hierarchical_scores: str = "dense",
) -> dict[str, list[str]]:
    """Every key :meth:`~schce.HCEClassifier.predict` writes, by place."""
    obs = ["prediction", "prediction_ontology_term_id", "confidence", "prediction_coarse"]
    obs += ["prediction_coarse_ontology_term_id", "unassigned_reason"]
    obs = [f"{key_added}_{c}" for c in obs] + (voting_keys(key_added, over_clustering) if majority_voting else [])
    obsm = [f"{key_added}_probabilities", f"{key_added}_hierarchical_scores", f"X_{key_added}"]
    if hierarchical_scores == "none":
        obsm.remove(f"{key_added}_hierarchical_scores")
    return {"obs": obs, "obsm": obsm}


def voting_keys(key_added: str, over_clustering: str | None = None) -> list[str]:
    """The ``obs`` columns of a majority vote (:func:`schce.majority_vote`, ``predict(majority_voting=True)``)."""
    obs = ["majority_voting", "majority_voting_ontology_term_id", "majority_voting_fraction"]
    return [f"{key_added}_{c}" for c in obs + (["over_clustering"] if over_clustering is None else [])]


def written_before(adata: AnnData, key_added: str) -> set[tuple[str, str]]:
    """The ``(place, key)`` entries an earlier ``predict`` recorded in ``uns[key_added]``; empty when none."""
    prev = adata.uns.get(key_added)
    if not isinstance(prev, Mapping) or "schce_version" not in prev:
        return set()
    written = prev.get("written")
    if not isinstance(written, Mapping):  # written by a schce that did not record its keys: its fixed names
        written = output_keys(key_added)
    ours = {(place, str(k)) for place in ("obs", "obsm") for k in np.asarray(written.get(place, []), dtype=str)}
    return ours | {("uns", key_added)}


def check_query_columns(adata: AnnData, truth_key: str | None, over_clustering: str | None) -> None:
    """The ``obs`` columns ``predict`` reads besides the expression must exist (checked before any work)."""
    for key, what in ((truth_key, "truth_key"), (over_clustering, "over_clustering")):
        if key is not None and key not in adata.obs.columns:
            raise KeyError(
                f"{what}={key!r} is not a column of adata.obs. Available columns: {list(adata.obs.columns)}."
            )


def check_output_keys(adata: AnnData, key_added: str, overwrite: bool = False, **planned_options) -> list[str]:
    """Refuse to overwrite entries that ``predict`` did not write; return those it will replace (its own).

    Run before any work. ``overwrite=True`` replaces foreign entries of the same names too. ``planned_options``
    go to :func:`output_keys` (majority voting adds its columns).
    """
    check_key_added(key_added)
    return check_foreign_keys(adata, key_added, output_keys(key_added, **planned_options), overwrite)


def check_foreign_keys(
    adata: AnnData,
    key_added: str,
    planned: Mapping[str, list[str]],
    overwrite: bool,
    ours: set[tuple[str, str]] | None = None,
    name: str = "adata",
) -> list[str]:
    """The one rule for every schce writer: refuse entries of the ``planned`` names that schce did not write.

    ``planned`` lists the ``obs`` columns and ``obsm`` keys to be written (``uns[key_added]`` always is, unless
    ``ours`` is given). Entries an earlier schce call recorded in ``uns[key_added]["written"]`` (or listed in
    ``ours``) are schce's own and returned (to be replaced, with a log line); any other is an error naming it and the
    ways out, unless ``overwrite=True`` (then a warning). ``name`` names ``adata`` in the message.
    """
    present = [("obs", c) for c in planned.get("obs", []) if c in adata.obs.columns]
    present += [("obsm", k) for k in planned.get("obsm", []) if k in adata.obsm]
    if ours is None:
        present += [("uns", key_added)] if key_added in adata.uns else []
        ours = written_before(adata, key_added)
    foreign = [f"{place}[{key!r}]" for place, key in present if (place, key) not in ours]
    if foreign and not overwrite:
        raise ValueError(
            f"{name} already holds {', '.join(foreign)}, which schce did not write. Pass key_added= another prefix "
            "(e.g. key_added='schce2'), rename that entry, or pass overwrite=True to replace it."
        )
    if foreign:
        logger.warning("Overwriting entries schce did not write (overwrite=True): %s.", ", ".join(foreign))
    return [f"{place}[{key!r}]" for place, key in present]


def pulled_columns(mdata, rna: AnnData, key_added: str) -> set[tuple[str, str]]:
    """The ``mdata.obs`` copies of schce's columns of the RNA modality ``rna`` (``"rna:schce_prediction"``)."""
    mod = next(name for name, m in mdata.mod.items() if m is rna)
    return {("obs", f"{mod}:{k}") for place, k in written_before(rna, key_added) if place == "obs"}


def check_pulled_keys(mdata, rna: AnnData, key_added: str, overwrite: bool = False, **planned_options) -> None:
    """For a MuData, the ``mdata.obs`` copies ``predict`` pulls of its columns follow the same rule.

    A copy is schce's when the modality's record lists its column. Run before any work.
    """
    mod = next(name for name, m in mdata.mod.items() if m is rna)
    ours = pulled_columns(mdata, rna, key_added)
    planned = {"obs": [f"{mod}:{c}" for c in output_keys(key_added, **planned_options)["obs"]]}
    check_foreign_keys(mdata, key_added, planned, overwrite, ours=ours, name="mdata")


def pull_outputs(mdata, rna: AnnData, key_added: str, columns: list[str], before: set[tuple[str, str]]) -> None:
    """Copy ``columns`` of the RNA modality into ``mdata.obs`` (``"rna:<column>"``); drop stale copies of schce's.

    ``before``: the copies that were schce's before this run (:func:`pulled_columns`, read before writing).
    """
    mod = next(name for name, m in mdata.mod.items() if m is rna)
    stale = [k for place, k in sorted(before) if k not in {f"{mod}:{c}" for c in columns} and k in mdata.obs]
    if stale:
        mdata.obs.drop(columns=stale, inplace=True)
    with warnings.catch_warnings():  # pandas' copy warning raised inside mudata 0.3's pull_obs
        warnings.simplefilter("ignore", pd.errors.SettingWithCopyWarning)
        mdata.pull_obs(columns=columns, mods=[mod])


def record_written(adata: AnnData, key_added: str, obs_columns: list[str], dropped: list[str] = ()) -> None:
    """Add ``obs_columns`` to the keys ``uns[key_added]["written"]`` records as schce's (``dropped`` leave it).

    Creates a minimal record (schce's version and the keys) when ``uns[key_added]`` is not schce's, so a later call
    recognises these columns as its own. Run after :func:`check_foreign_keys`.
    """
    from schce import __version__

    before = sorted(written_before(adata, key_added))
    record = dict(adata.uns[key_added]) if before else {"schce_version": __version__}
    obs = [key for place, key in before if place == "obs" and key not in dropped]
    obsm = [key for place, key in before if place == "obsm"]
    record["written"] = {"obs": obs + [c for c in obs_columns if c not in obs], "obsm": obsm}
    adata.uns[key_added] = record


def write_outputs(
    adata: AnnData,
    obs: pd.DataFrame,
    obsm: dict[str, np.ndarray | pd.DataFrame],
    uns: dict,
    key_added: str,
    overwrite: bool = False,
) -> None:
    """Write predictions into ``adata``; only schce's own keys change, and overwriting them is logged.

    What is written is recorded in ``uns[key_added]["written"]``, so a later run knows which keys are schce's. Entries
    an earlier run wrote that this one does not (its majority vote, its hierarchical scores) are removed, so no stale
    output stays beside new ones.
    """
    planned = {"majority_voting": f"{key_added}_majority_voting" in obs.columns}
    planned["over_clustering"] = None if f"{key_added}_over_clustering" in obs.columns else "given"
    planned["hierarchical_scores"] = "dense" if f"{key_added}_hierarchical_scores" in obsm else "none"
    replaced = check_output_keys(adata, key_added, overwrite, **planned)
    if replaced:
        logger.info("Overwriting earlier schce outputs: %s.", ", ".join(replaced))
    before = written_before(adata, key_added)
    stale = sorted(f"obs[{k!r}]" for place, k in before if place == "obs" and k not in obs and k in adata.obs)
    stale += sorted(f"obsm[{k!r}]" for place, k in before if place == "obsm" and k not in obsm and k in adata.obsm)
    for place, key in sorted(before):
        if place == "obs" and key not in obs.columns and key in adata.obs.columns:
            del adata.obs[key]
            adata.uns.pop(f"{key}_colors", None)
        elif place == "obsm" and key not in obsm and key in adata.obsm:
            del adata.obsm[key]
    if stale:
        logger.info("Removed the earlier run's %s (not written by this run).", ", ".join(stale))
    for column in obs.columns:
        adata.obs[column] = (
            obs[column].to_numpy() if not isinstance(obs[column].dtype, pd.CategoricalDtype) else obs[column].values
        )
    for key, value in obsm.items():
        adata.obsm[key] = value
    adata.uns[key_added] = {**uns, "written": {"obs": list(obs.columns), "obsm": list(obsm)}}
