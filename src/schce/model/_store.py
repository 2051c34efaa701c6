"""What :class:`~schce.HCEClassifier` needs from a scTab store or a data module: its set-up and a split's scores."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from schce.data._protocol import check_datamodule, check_split
from schce.data.sctab._format import cl_label_ids, read_lookup, read_var, split_parts, store_layout
from schce.data.sctab._read import _read_block
from schce.hierarchy import compare_hierarchy
from schce.train._runner import loader_outputs

logger = logging.getLogger(__name__)


def store_setup(path: str | os.PathLike, ontology=None, hierarchy: str = "store", normalize="auto") -> dict:
    """Genes, labels (CL IDs, in code order), hierarchy and normalisation of a model trained on a store.

    The store's ``child_matrix.npy`` is compared with the ontology; differences are logged (and returned under
    ``"differences"``). ``hierarchy="store"`` trains on the store's relations between labels, ``"ontology"`` on the
    ontology's (with the labels' non-label ancestors, for coarse back-off calls).
    """
    from schce.hierarchy import Hierarchy
    from schce.ontology import load_cell_ontology

    if hierarchy not in ("store", "ontology"):
        raise ValueError(f"hierarchy must be 'store' or 'ontology', got {hierarchy!r}.")
    if normalize not in ("auto", True, False):
        raise ValueError(f"normalize must be 'auto', True or False, got {normalize!r}.")
    store_layout(path)  # a clear error when path is not a store
    var = read_var(path)
    genes = (var["feature_id"] if "feature_id" in var.columns else var["feature_name"]).astype(str).tolist()
    names = read_lookup(path, "cell_type")
    onto = load_cell_ontology(ontology)
    labels = cl_label_ids(names, onto, f"cell_type labels of {path}", "the store cannot be used as is.")
    child_file = Path(path) / "cell_type_hierarchy" / "child_matrix.npy"
    differences = None
    if child_file.is_file():
        child = np.load(child_file)
        differences = compare_hierarchy(child, labels, onto)
        if len(differences):
            logger.warning(
                "The store's child_matrix.npy and the Cell Ontology %s disagree on %d relation(s) (%d only in the "
                "store, %d only in the ontology), e.g. %s.",
                onto.version,
                len(differences),
                int(differences["in_store"].sum()),
                int(differences["in_ontology"].sum()),
                "; ".join(
                    f"{r.ancestor_name} > {r.descendant_name} ({'store' if r.in_store else 'ontology'} only)"
                    for r in differences.head(3).itertuples()
                ),
            )
        else:
            logger.info("The store's child_matrix.npy agrees with the Cell Ontology %s.", onto.version)
    elif hierarchy == "store":
        raise FileNotFoundError(f"{child_file} is missing; pass hierarchy='ontology' to use the ontology's.")
    if hierarchy == "store":
        names = {t: onto.name(t) for t in labels}
        hier = Hierarchy.from_child_matrix(labels, np.load(child_file), names, version=f"{onto.version} (store)")
    else:
        hier = Hierarchy.from_ontology(labels, onto)
    if normalize == "auto":
        normalize = store_holds_counts(path)
    return {
        "genes": genes,
        "labels": labels,
        "hierarchy": hier,
        "differences": differences,
        "normalize": bool(normalize),
        "ontology": onto,
    }


def store_holds_counts(path: str | os.PathLike, split: str = "train") -> bool:
    """Whether a store holds raw counts (our synthetic stores) rather than log1p-normalised values (scTab's)."""
    part = split_parts(path, split)[0]
    block = _read_block(pq.ParquetFile(part), 0, store_layout(path), len(read_var(path)), columns=[])
    sample = block.to_csr(len(block)).data
    counts = bool(len(sample)) and bool(np.all(sample == np.round(sample)) and sample.min() >= 0)
    logger.info("The store holds %s.", "raw counts; the model normalises them" if counts else "normalised values")
    return counts


def datamodule_predictions(model, datamodule, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """True CL IDs, logits and cell metadata (indexed by cell id) of one split of a datamodule."""
    if not model.is_trained_:
        raise RuntimeError("The model is not trained yet: call model.train() first, or HCEClassifier.load(...).")
    check_datamodule(datamodule, len(model.genes), model.hierarchy.n_labels)
    check_split(split)
    names = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
    loader = getattr(datamodule, names[split])()
    normalize = model.setup_state.normalize
    if getattr(datamodule, "path", None) and model.setup_state.sctab_store is None:
        # A model not built on this store (e.g. a published checkpoint) reads what the store holds.
        normalize = store_holds_counts(datamodule.path, split)
    out = loader_outputs(model.module, loader, normalize, desc=f"Scoring {split}")
    if "y" not in out or len(out["y"]) == 0:
        raise ValueError(f"The datamodule's {split} split yielded no labelled cells.")
    true_terms = np.asarray(model.hierarchy.labels, dtype=object)[out["y"]]
    ids = out.get("idx", np.arange(len(out["y"])))
    obs = datamodule.read_obs(split).reindex(ids)
    obs.index = pd.Index(ids.astype(str))
    return true_terms, out["logits"], obs


def datamodule_probabilities(models: list, datamodule, split: str, calibrated: bool):
    """True CL IDs, the mean of ``models``' probabilities and the cell metadata of one split of a datamodule."""
    total, first = None, None
    for model in models:
        true_terms, logits, obs = datamodule_predictions(model, datamodule, split)
        if first is None:
            first = true_terms, obs
        elif not obs.index.equals(first[1].index):
            raise ValueError(
                f"The datamodule's {split} loader served its cells in a different order on another pass; an "
                "ensemble reads the split once per member, so its loader must not shuffle."
            )
        probs = model._probabilities(logits, calibrated)
        total = probs if total is None else total + probs
    return first[0], total / len(models), first[1]
