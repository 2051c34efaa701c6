from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
FIXTURES = Path(__file__).parent / "data"
SMALL_MLP = {"n_hidden": 32, "n_layers": 2}
# CI sets this: there a missing ../shared is a failure, not a skip that leaves a green run testing less.
REQUIRE_SHARED = os.environ.get("SCHCE_REQUIRE_SHARED_DATA", "") not in ("", "0")
SHARED_ABSENT = "[../shared absent]"  # marks the skip reason, so the summary can count these skips


class Crash(RuntimeError):
    """Raised by :class:`CrashAfter`: an interrupted run in the resume tests."""


class CrashAfter(pl.Callback):
    """Raises :class:`Crash` after ``steps`` training steps, like a job killed mid-epoch."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            raise Crash(f"interrupted after {trainer.global_step} steps")


def shared_path(*parts: str) -> Path:
    """A file under ../shared (``data/...`` or ``reference/...``), or skip the test saying so (fail in CI)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{SHARED_ABSENT} {path} is missing: this test needs the project's ../shared beside the repository."
        if REQUIRE_SHARED:
            pytest.fail(f"{reason} SCHCE_REQUIRE_SHARED_DATA is set, so this is an error.", pytrace=False)
        pytest.skip(reason)
    return path


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason (fail in CI)."""
    return shared_path("data", *parts)


def pytest_terminal_summary(terminalreporter):
    """Say loudly, last, how many tests a missing ../shared skipped: a green run without it tests less."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SHARED_ABSENT in str(r.longrepr)]
    if not skipped:
        return
    terminalreporter.section("tests skipped for missing ../shared", sep="!", red=True, bold=True)
    for report in skipped:
        terminalreporter.write_line(f"SKIPPED {report.nodeid}", yellow=True)
    terminalreporter.write_line(
        f"{len(skipped)} tests did not run because ../shared is absent (real data, the full CL release, scTab "
        "reference facts). Put the project's shared folder beside the repository to run them; CI sets "
        "SCHCE_REQUIRE_SHARED_DATA=1 so that there they fail instead.",
        red=True,
        bold=True,
    )


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
