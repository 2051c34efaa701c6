"""What :class:`~schce.HCEClassifier` needs from a scTab store or a datamodule: setup, loaders, inference."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from schce.data._store import compare_hierarchy, read_lookup, read_var, split_parts, store_layout

logger = logging.getLogger(__name__)


def store_setup(path: str | os.PathLike, ontology=None, hierarchy: str = "store", normalize="auto") -> dict:
    """Genes, labels (CL IDs, in code order), hierarchy and normalisation of a model trained on a store.

    The store's ``child_matrix.npy`` is compared with the ontology; differences are logged (and returned under
    ``"differences"``). ``hierarchy="store"`` trains on the store's relations between labels, ``"ontology"`` on the
    ontology's (with the labels' non-label ancestors, for coarse back-off calls).
    """
    from schce.data._datamodule import _read_block
    from schce.hierarchy import Hierarchy
    from schce.ontology import load_cell_ontology

    if hierarchy not in ("store", "ontology"):
        raise ValueError(f"hierarchy must be 'store' or 'ontology', got {hierarchy!r}.")
    if normalize not in ("auto", True, False):
        raise ValueError(f"normalize must be 'auto', True or False, got {normalize!r}.")
    layout = store_layout(path)
    var = read_var(path)
    genes = (var["feature_id"] if "feature_id" in var.columns else var["feature_name"]).astype(str).tolist()
    names = read_lookup(path, "cell_type")
    onto = load_cell_ontology(ontology)
    mapping = onto.map_labels(names)
    labels = [mapping[n] for n in names]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Several cell_type labels of {path} map to the same CL term; the store cannot be used as is.")
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
        child = np.asarray(np.load(child_file)) != 0
        edges = [(labels[i], labels[j]) for i, j in zip(*np.nonzero(child), strict=True) if i != j]
        hier = Hierarchy(labels, edges, names={t: onto.name(t) for t in labels}, version=f"{onto.version} (store)")
    else:
        hier = Hierarchy.from_ontology(labels, onto)
    if normalize == "auto":
        # The published store holds log1p-normalised values, our synthetic stores raw counts: look at the data.
        part = split_parts(path, "train")[0]
        block = _read_block(pq.ParquetFile(part), 0, layout, len(genes), columns=[])
        sample = block.to_csr(len(block)).data
        normalize = bool(len(sample)) and bool(np.all(sample == np.round(sample)) and sample.min() >= 0)
        logger.info(
            "The store holds %s.", "raw counts; the model normalises them" if normalize else "normalised values"
        )
    return {
        "genes": genes,
        "labels": labels,
        "hierarchy": hier,
        "differences": differences,
        "normalize": bool(normalize),
        "ontology": onto,
    }


def check_datamodule(datamodule, genes: list[str], n_labels: int) -> None:
    """A datamodule must feed the model's genes and labels; checked when it says what it holds."""
    for name in ("train_dataloader", "val_dataloader"):
        if not callable(getattr(datamodule, name, None)):
            raise TypeError(f"datamodule must have a {name}() method (a LightningDataModule), got {type(datamodule)}.")
    n_genes = getattr(datamodule, "n_genes", None)
    if n_genes is not None and n_genes != len(genes):
        raise ValueError(f"The datamodule yields {n_genes} genes; the model expects {len(genes)}.")
    labels = getattr(datamodule, "labels", None)
    if labels is not None and len(labels) != n_labels:
        raise ValueError(
            f"The datamodule's labels ({len(labels)}) are not the model's ({n_labels}): build the model from the same "
            "store with HCEClassifier.from_sctab_store."
        )


def datamodule_class_weights(datamodule, class_weights, n_labels: int) -> np.ndarray | None:
    """Training class weights: the store's ``class_weights.npy`` when it has one, else balanced label counts."""
    if class_weights is None:
        return None
    stored = getattr(datamodule, "class_weights", None)
    if stored is not None:
        stored = np.asarray(stored, dtype=np.float64)
        if stored.shape != (n_labels,):
            raise ValueError(f"The store's class_weights.npy has shape {stored.shape}; expected ({n_labels},).")
        return stored
    counts = getattr(datamodule, "label_counts", None)  # a method (store) or an array (census datamodule)
    if callable(counts):
        counts = counts("train")
    if counts is None:
        logger.warning("The datamodule has neither class_weights nor label_counts; training without class weights.")
        return None
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros(n_labels)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def scaling_loader(datamodule) -> Iterable[dict]:
    """Training batches to estimate the gene scaling from (the caller stops after enough cells).

    A scTab store is read in this process, one shuffled row group at a time, in small batches: a pass through the
    datamodule's worker loader left the training epoch 1.9 GiB higher (summed over its workers) on the
    200,000-cell benchmark store. Other datamodules give their training loader.
    """
    from schce.data._datamodule import SCTabStoreDataModule, StoreDataset

    if not isinstance(datamodule, SCTabStoreDataModule):
        return datamodule.train_dataloader()
    train = datamodule.dataset("train")
    sample = StoreDataset(train.path, "train", 256, shuffle=True, seed=train.seed, buffer_size=1)
    return DataLoader(sample, batch_size=None, num_workers=0)


def loader_outputs(module, loader, normalize: bool, desc: str = "Predicting") -> dict[str, np.ndarray]:
    """Logits and embeddings of every batch of ``loader`` (eval mode, no gradients), with ``y`` / ``idx`` if given."""
    device = next(module.parameters()).device
    module.eval()
    out: dict[str, list] = {"logits": [], "embeddings": []}
    try:
        total = len(loader)
    except TypeError:
        total = None
    with torch.inference_mode():
        # A bar only when the pass is long enough to wait for.
        for batch in tqdm(loader, desc=desc, unit="batch", total=total, disable=total is not None and total < 20):
            logits, h = module(batch["x"].to(device), normalize=normalize)
            out["logits"].append(logits.float().cpu())
            out["embeddings"].append(h.float().cpu())
            for key in ("y", "idx"):
                if key in batch:
                    out.setdefault(key, []).append(batch[key].cpu())
    return {k: torch.cat(v).numpy() if v else np.empty((0, 0), np.float32) for k, v in out.items()}


def datamodule_sizes(datamodule) -> tuple[int, int, int]:
    """Training and validation cells and the batch size of a datamodule (``-1`` where it cannot tell)."""
    n_cells = getattr(datamodule, "n_cells", None)
    if callable(n_cells):
        n_train, n_val = int(n_cells("train")), int(n_cells("val"))
    elif hasattr(datamodule, "n_train") and hasattr(datamodule, "n_validation"):  # the census datamodule
        n_train, n_val = int(datamodule.n_train), int(datamodule.n_validation)
    else:
        n_train, n_val = -1, int(datamodule.val_dataloader() is not None)
    return n_train, n_val, int(getattr(datamodule, "batch_size", -1) or -1)


def datamodule_predictions(model, datamodule, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """True CL IDs, logits and cell metadata (indexed by cell id) of one split of a datamodule."""
    if not model.is_trained_:
        raise RuntimeError("The model is not trained yet: call model.train() first, or HCEClassifier.load(...).")
    check_datamodule(datamodule, model.genes, model.hierarchy.n_labels)
    names = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
    if split not in names:
        raise ValueError(f"split must be one of {list(names)}, got {split!r}.")
    from schce._constants import SETUP_KEY

    loader = getattr(datamodule, names[split])()
    out = loader_outputs(model.module, loader, model.registry_[SETUP_KEY]["normalize"], desc=f"Scoring {split}")
    if "y" not in out or len(out["y"]) == 0:
        raise ValueError(f"The datamodule's {split} split yielded no labelled cells.")
    true_terms = np.asarray(model.hierarchy.labels, dtype=object)[out["y"]]
    ids = out.get("idx", np.arange(len(out["y"])))
    if callable(getattr(datamodule, "read_obs", None)):
        obs = datamodule.read_obs(split).reindex(ids)
    else:
        obs = pd.DataFrame(index=ids)
    obs.index = pd.Index(ids.astype(str))
    return true_terms, out["logits"], obs
