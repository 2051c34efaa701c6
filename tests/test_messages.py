"""What a Python user sees: schce's INFO messages by default, a documented switch, warnings that name labels."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest

import schce

SCRIPT = """
import logging, warnings
import schce
{verbosity}
from schce.datasets import pbmc68k
adata = pbmc68k()[:300].copy()
adata.obs["label"] = adata.obs["cell_type"].astype(str)
adata.obs.iloc[:2, adata.obs.columns.get_loc("label")] = "mast cell"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    schce.HCEClassifier.setup_anndata(adata, labels_key="label")
print("WARNINGS:", [str(w.message) for w in caught if "fewer than 3" in str(w.message)])
"""


def _run(verbosity: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(verbosity=verbosity)], capture_output=True, text=True, timeout=300
    )


def test_a_script_without_logging_setup_sees_schces_info_lines_and_a_named_small_label_warning():
    out = _run()
    assert out.returncode == 0, out.stderr
    assert "INFO: adata.X looks like raw counts" in out.stderr  # the input type detected, as the CLI prints it
    assert "WARNING: obs['label'] has fewer than 3 cells of: 'mast cell' (2)" in out.stderr
    assert "_scvi_labels" not in out.stderr and "WARNINGS: []" in out.stdout  # scvi's own warning is gone
    assert out.stderr.count("looks like raw counts") == 1  # printed once


def test_verbosity_warning_silences_the_info_lines():
    out = _run('schce.settings.verbosity = "warning"')
    assert out.returncode == 0, out.stderr
    assert "INFO:" not in out.stderr
    assert "fewer than 3 cells of: 'mast cell'" in out.stderr


def test_settings_verbosity_sets_the_schce_logger_level():
    logger = logging.getLogger("schce")
    before = logger.level
    try:
        schce.settings.verbosity = "error"
        assert logger.level == logging.ERROR and schce.settings.verbosity == "error"
        schce.settings.verbosity = logging.DEBUG
        assert schce.settings.verbosity == "debug"
        with pytest.raises(ValueError, match="verbosity must be one of"):
            schce.settings.verbosity = "loud"
    finally:
        logger.setLevel(before)


def test_no_scvi_warning_in_a_normal_set_up(pbmc_copy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key="cell_type_ontology_term_id")
    assert not [w for w in caught if "_scvi" in str(w.message)]
    assert np.asarray(pbmc_copy.obs["_scvi_labels"]).size == pbmc_copy.n_obs
