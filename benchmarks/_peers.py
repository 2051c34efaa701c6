"""Peer methods for the real-data benchmark, run on the same splits as schce: CellTypist and scANVI.

Each takes ``(train, test, seed)`` with ``train.obs["training_label"]`` and returns one predicted label per test cell.
They need the ``benchmark`` extra (``pip install -e ".[benchmark]"``); the library never imports them.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

PEERS = ("celltypist", "scanvi")


def counts(adata: ad.AnnData) -> sp.csr_matrix:
    """Integer counts of ``adata``: ``X`` when it holds counts; for scClassify's log2(scaled count + 1) files the
    counts recovered per cell (non-zero ``2^X − 1`` are multiples of the cell's smallest value)."""
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    if np.array_equal(X.data, np.round(X.data)):
        return X.astype(np.float32)
    X.data = np.expm1(X.data * np.log(2))
    for i in range(X.shape[0]):
        row = X.data[X.indptr[i] : X.indptr[i + 1]]
        if row.size:
            row /= row.min()
    X.data = np.round(X.data)
    return X.astype(np.float32)


def _lognorm(adata: ad.AnnData) -> ad.AnnData:
    """CellTypist's expected input: counts scaled to 10,000 per cell, then log1p."""
    import scanpy as sc

    out = ad.AnnData(counts(adata), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


class _OneVsRestLogisticRegression:
    """CellTypist's classifier, ``LogisticRegression(multi_class="ovr")``, for scikit-learn ≥ 1.8 (which dropped the
    argument): one binary logistic regression per class, stacked into the ``coef_`` / ``intercept_`` it reads."""

    def __init__(self, multi_class: str = "ovr", n_jobs=None, **kwargs):
        self.kwargs = kwargs

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y)
        self.classes_ = np.unique(y)
        targets = self.classes_[1:] if len(self.classes_) == 2 else self.classes_
        fits = [LogisticRegression(**self.kwargs).fit(X, y == k) for k in targets]
        self.coef_ = np.vstack([f.coef_ for f in fits])
        self.intercept_ = np.concatenate([f.intercept_ for f in fits])
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X):
        scores = np.asarray(X @ self.coef_.T) + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores


def celltypist_predict(train: ad.AnnData, test: ad.AnnData, seed: int) -> np.ndarray:
    """CellTypist 1.7 with its defaults (logistic regression on all genes), majority voting off."""
    import sys

    import celltypist
    import sklearn

    if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8):
        sys.modules["celltypist.train"].LogisticRegression = _OneVsRestLogisticRegression

    np.random.seed(seed)  # CellTypist draws from numpy's global generator
    ref = _lognorm(train)
    model = celltypist.train(ref, labels=train.obs["training_label"].astype(str).to_numpy(), n_jobs=1)
    result = celltypist.annotate(_lognorm(test), model=model, majority_voting=False)
    return result.predicted_labels["predicted_labels"].astype(str).to_numpy()


def scanvi_predict(train: ad.AnnData, test: ad.AnnData, seed: int) -> np.ndarray:
    """scvi-tools' reference mapping: scVI on the reference, scANVI from it, then the query mapped with scArches."""
    import scvi

    scvi.settings.seed = seed
    warnings.filterwarnings("ignore")
    ref = ad.AnnData(counts(train), obs=train.obs[["training_label"]].copy(), var=train.var[[]].copy())
    ref.obs["training_label"] = ref.obs["training_label"].astype(str)
    batch = "batch" if "batch" in train.obs else None
    if batch:
        ref.obs[batch] = train.obs[batch].astype(str).to_numpy()
    scvi.model.SCVI.setup_anndata(ref, batch_key=batch)
    vae = scvi.model.SCVI(ref, n_layers=2, n_latent=30)
    vae.train(enable_progress_bar=False, accelerator="cpu")
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown", labels_key="training_label")
    lvae.train(max_epochs=20, n_samples_per_label=100, enable_progress_bar=False, accelerator="cpu")
    query = ad.AnnData(counts(test), obs=test.obs[[]].copy(), var=test.var[[]].copy())
    if batch:
        query.obs[batch] = "query"
    query.obs["training_label"] = "Unknown"
    scvi.model.SCANVI.prepare_query_anndata(query, lvae)
    qvae = scvi.model.SCANVI.load_query_data(query, lvae)
    qvae.train(max_epochs=100, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False, accelerator="cpu")
    return np.asarray(qvae.predict(), dtype=str)


PREDICT = {"celltypist": celltypist_predict, "scanvi": scanvi_predict}
