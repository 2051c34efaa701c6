"""Issue 24: raw counts, normalised, log-normalised and scaled data are told apart, and acted on."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

import schce
from schce.data._expression import check_expression, resolve_normalize

from .conftest import SMALL_MLP


def _counts(pbmc) -> np.ndarray:
    return pbmc.X.toarray().astype(np.float64)


def _cp10k(counts: np.ndarray) -> np.ndarray:
    return counts / counts.sum(1, keepdims=True) * 1e4


def _kind(X) -> str:
    return check_expression(X, X.shape[0]).kind


def test_kinds_are_told_apart(pbmc):
    counts = _counts(pbmc)
    assert _kind(sp.csr_matrix(counts)) == "counts"
    assert _kind(counts * 0.97) == "scaled counts"
    assert _kind(sp.csr_matrix(_cp10k(counts).astype(np.float32))) == "normalized"
    assert _kind(_cp10k(counts) / 100) == "normalized"  # CPM-like totals at any scale
    assert _kind(sp.csr_matrix(np.log1p(_cp10k(counts)).astype(np.float32))) == "log1p"
    assert _kind(np.log1p(counts)) == "log-like"  # log without size factors


def test_scaled_data_are_refused_with_what_was_seen(pbmc):
    logn = np.log1p(_cp10k(_counts(pbmc)))
    z = (logn - logn.mean(0)) / (logn.std(0) + 1e-8)
    with pytest.raises(ValueError, match=r"contains \d+ negative value\(s\)\. Negative values \(minimum -.*scaled or"):
        check_expression(z, z.shape[0])


@pytest.mark.parametrize(
    ("make", "normalised", "text", "level"),
    [
        (lambda c: c * 0.97, True, "non-integer values above the log range", logging.WARNING),
        (_cp10k, True, "normalised counts without log", logging.WARNING),
        (lambda c: np.log1p(_cp10k(c)), False, "log1p-normalised values", logging.INFO),
        (np.log1p, False, "assumed log-normalised", logging.WARNING),
    ],
)
def test_auto_acts_on_the_kind_and_says_what_it_saw(pbmc, caplog, make, normalised, text, level):
    X = make(_counts(pbmc))
    with caplog.at_level(logging.INFO, logger="schce"):
        decision = resolve_normalize("auto", check_expression(X, X.shape[0], "adata.X"), "adata.X")
    assert decision is normalised
    (record,) = [r for r in caplog.records if "adata.X looks like" in r.getMessage()]
    assert text in record.getMessage() and record.levelno == level


@pytest.mark.parametrize("make", [lambda c: c * 0.97, _cp10k])
def test_count_like_queries_predict_as_the_counts_do(trained, pbmc, make):
    ref = trained.predict(pbmc.copy(), inplace=False)
    query = pbmc.copy()
    query.X = sp.csr_matrix(make(_counts(pbmc)).astype(np.float32))
    trained.predict(query)
    assert query.uns["schce"]["normalized"] is True
    assert query.uns["schce"]["expression"] in ("scaled counts", "normalized")
    np.testing.assert_allclose(query.obs["schce_confidence"], ref["schce_confidence"], rtol=1e-4, atol=1e-5)


def test_a_model_trained_without_normalising_predicts_without_normalising(pbmc, caplog):
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id", normalize=False)
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    model.train(max_epochs=2, seed=0, enable_progress_bar=False)
    assert model.setup_state.expression == "counts"
    default = model.predict(adata, key_added="auto")
    forced = model.predict(adata, normalize=False, key_added="forced")
    assert adata.uns["auto"]["normalized"] is False and adata.uns["auto"]["expression"] == "counts"
    np.testing.assert_allclose(default["auto_confidence"], forced["forced_confidence"], rtol=1e-6, atol=1e-7)
    # a query of another kind is used as given too, with a warning saying what differs
    query = pbmc.copy()
    query.X = sp.csr_matrix(np.log1p(_cp10k(_counts(pbmc))).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="schce"):
        model.predict(query)
    assert "trained on raw counts (non-negative integers) used as given (normalize=False)" in caplog.text
