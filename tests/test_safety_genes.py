"""Issue 24: duplicated genes are refused at set-up; duplicated query genes are reported."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import schce
from schce.data._genes import GeneAligner, model_genes

from .conftest import assert_unchanged, snapshot


def test_duplicated_var_names_are_refused_and_listed(pbmc_copy):
    adata = pbmc_copy
    names = list(adata.var_names)
    names[5] = names[2]
    adata.var_names = names
    before = snapshot(adata)
    with pytest.raises(ValueError, match=rf"1 duplicated gene\(s\) .*{names[2]} ×2"):
        schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    assert_unchanged(adata, before)
    assert "_scvi_labels" not in adata.obs


def test_ensembl_ids_colliding_without_version_are_refused():
    with pytest.raises(ValueError, match=r"ENSG00000000001 \(ENSG00000000001.1, ENSG00000000001.2\)"):
        model_genes(["ENSG00000000001.1", "ENSG00000000001.2", "ENSG00000000002.7"])
    assert model_genes(["ENSG00000000001.1", "ENSG00000000002.7", "CD3E"]) == [
        "ENSG00000000001",
        "ENSG00000000002",
        "CD3E",
    ]


def test_duplicated_query_genes_say_which_copy_is_used(caplog):
    model = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
    query = ["ENSG00000000002.4", "ENSG00000000001", "ENSG00000000002.5", "OTHER", "OTHER"]
    with caplog.at_level(logging.WARNING, logger="schce"):
        aligner = GeneAligner(model, query)
    assert "1 model gene(s) occur more than once" in caplog.text
    assert "ENSG00000000002: ENSG00000000002.4, ENSG00000000002.5 (column 0 used)" in caplog.text
    assert "OTHER" not in caplog.text  # not a model gene: it does not matter
    np.testing.assert_array_equal(aligner.index, [1, 0, -1])
