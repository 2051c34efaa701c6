from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).parent / "data"
SMALL_MLP = {"n_hidden": 32, "n_layers": 2}


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data tests need the project's ../shared/data beside the repository.")
    return path


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        yield


@pytest.fixture(scope="session")
def pbmc():
    """Bundled 700-cell PBMC data with counts and CL labels (no download)."""
    from schce.datasets import pbmc68k

    return pbmc68k()


@pytest.fixture
def pbmc_copy(pbmc):
    return pbmc.copy()


@pytest.fixture(scope="session")
def trained(pbmc):
    """A small HCE MLP trained for a few epochs on the PBMC data."""
    import schce

    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    model.train(max_epochs=4, seed=0, enable_progress_bar=False)
    return model


def snapshot(adata) -> dict:
    """Everything a user could lose: X, layers, obs, var, obsm and uns keys."""
    import scipy.sparse as sp

    def dense(m):
        return m.toarray() if sp.issparse(m) else np.array(m)

    return {
        "X": dense(adata.X),
        "layers": {k: dense(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": sorted(adata.obsm.keys()),
        "uns": sorted(adata.uns.keys()),
    }


def assert_unchanged(adata, before: dict) -> None:
    after = snapshot(adata)
    np.testing.assert_array_equal(after["X"], before["X"])
    assert after["layers"].keys() == before["layers"].keys()
    for k in before["layers"]:
        np.testing.assert_array_equal(after["layers"][k], before["layers"][k])
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    pd.testing.assert_frame_equal(after["var"], before["var"])
    assert after["obsm"] == before["obsm"]
    assert after["uns"] == before["uns"]
