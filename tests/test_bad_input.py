"""Every bad input fails before any work, with a message naming the problem and the fix, and changes nothing."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import assert_unchanged, shared_file, snapshot

import schce
from schce.hierarchy import HierarchyCycleError
from schce.ontology import LabelMappingError


def _setup_fails(adata, exc, match, **kwargs):
    before = snapshot(adata)
    kwargs.setdefault("labels_key", "cell_type_ontology_term_id")
    with pytest.raises(exc, match=match):
        schce.HCEClassifier.setup_anndata(adata, **kwargs)
    assert_unchanged(adata, before)


def test_missing_labels_key(pbmc_copy):
    _setup_fails(pbmc_copy, KeyError, r"labels_key='celltype' is not a column .*bulk_labels", labels_key="celltype")


def test_missing_batch_key(pbmc_copy):
    _setup_fails(pbmc_copy, KeyError, "batch_key='donor'", batch_key="donor")


def test_missing_layer(pbmc_copy):
    _setup_fails(pbmc_copy, KeyError, r"Layer 'counts' is not in adata.layers .*layer=None", layer="counts")


def test_labels_not_in_ontology_are_all_listed_with_close_names(pbmc_copy):
    adata = pbmc_copy
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:5] = "T-cell helper"
    labels[5:10] = "B cells"
    labels[10:12] = "CL:99999999"
    adata.obs["bad"] = labels
    before = snapshot(adata)
    with pytest.raises(LabelMappingError) as err:
        schce.HCEClassifier.setup_anndata(adata, labels_key="bad")
    msg = str(err.value)
    assert sorted(err.value.unmapped) == ["B cells", "CL:99999999", "T-cell helper"]
    assert "B cell" in msg  # a close name is suggested
    assert "CL:0000084" in msg or "CL IDs" in msg  # and how to fix it
    assert_unchanged(adata, before)


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative")])
@pytest.mark.parametrize("dense", [False, True])
def test_non_finite_or_negative_counts(pbmc_copy, value, word, dense):
    adata = pbmc_copy
    X = adata.X.toarray()
    X[3, 7] = value
    adata.X = X if dense else sp.csr_matrix(X)
    _setup_fails(adata, ValueError, rf"adata.X contains 1 {word} value")


def test_bad_values_in_a_query_are_caught_before_writing(trained, pbmc):
    query = pbmc.copy()
    X = query.X.toarray()
    X[0, 0] = -5
    query.X = sp.csr_matrix(X)
    before = snapshot(query)
    with pytest.raises(ValueError, match="negative"):
        trained.predict(query)
    assert_unchanged(query, before)


def test_empty_anndata(pbmc_copy):
    _setup_fails(pbmc_copy[:0].copy(), ValueError, r"adata is empty \(0 cells")


def test_single_class(pbmc_copy):
    adata = pbmc_copy[pbmc_copy.obs["cell_type_ontology_term_id"] == "CL:0000236"].copy()
    _setup_fails(adata, ValueError, "single cell type")


def test_missing_labels(pbmc_copy):
    adata = pbmc_copy
    adata.obs["partial"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("partial")] = None
    _setup_fails(adata, ValueError, "3 cell.*have no label", labels_key="partial")


def test_predict_before_train(pbmc_copy):
    adata = pbmc_copy
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, n_hidden=16, n_layers=1)
    before = snapshot(adata)
    with pytest.raises(RuntimeError, match=r"not trained yet: call model.train\(\)"):
        model.predict(adata)
    assert_unchanged(adata, before)


def test_query_without_gene_overlap_names_both_id_types(trained, pbmc):
    query = pbmc.copy()
    query.var_names = [f"ENSG{i:011d}" for i in range(query.n_vars)]
    before = snapshot(query)
    with pytest.raises(ValueError, match=r"No gene overlap.*Ensembl IDs.*gene symbols.*gene_symbols="):
        trained.predict(query)
    assert_unchanged(query, before)
    with pytest.raises(KeyError, match="gene_symbols='symbol'"):
        trained.predict(query, gene_symbols="symbol")


def test_empty_query(trained, pbmc):
    with pytest.raises(ValueError, match="query is empty"):
        trained.predict(pbmc[:0].copy())


def test_hierarchy_with_a_cycle():
    with pytest.raises(HierarchyCycleError, match="cycle: .*a -> b -> c|b -> c -> a|c -> a -> b"):
        schce.Hierarchy.from_edges([("a", "b"), ("b", "c"), ("c", "a"), ("a", "d")])


def test_loading_files_that_are_not_models(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        schce.HCEClassifier.load(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a schce model directory"):
        schce.HCEClassifier.load(tmp_path)
    with pytest.raises(ValueError, match="not a schce model directory"):
        schce.HCEClassifier.load(tmp_path / "notes.txt")

    good = tmp_path / "model"
    trained.save(good)
    weights = (good / "model.pt").read_bytes()
    (good / "model.pt").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.pt does not match the checksum"):
        schce.HCEClassifier.load(good)

    trained.save(good, overwrite=True)
    (good / "schce.json").write_text("{not json")
    with pytest.raises(ValueError, match="schce.json is corrupt"):
        schce.HCEClassifier.load(good)
    (good / "schce.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not schce model metadata"):
        schce.HCEClassifier.load(good)


def test_cellxgene_invalid_example_labels_are_reported():
    adata = ad.read_h5ad(shared_file("real", "cellxgene_schema_example_invalid_CL.h5ad"))
    before = snapshot(adata)
    with pytest.raises(LabelMappingError) as err:
        schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    assert {"CL:12312", "PATO:0000461"} <= set(err.value.unmapped)
    assert_unchanged(adata, before)
