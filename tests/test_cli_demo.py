from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

import schce
from schce.cli import cli
from schce.datasets import PBMC68K_LABELS_TO_CL


def test_pbmc68k_has_counts_and_cl_labels(pbmc):
    assert pbmc.shape == (700, 765)
    X = pbmc.X.toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X))
    assert set(pbmc.obs["cell_type_ontology_term_id"]) == set(PBMC68K_LABELS_TO_CL.values())
    onto = schce.load_cell_ontology()
    for cl_id, name in zip(pbmc.obs["cell_type_ontology_term_id"], pbmc.obs["cell_type"], strict=True):
        assert onto.name(cl_id) == name
    # counts recovered from scanpy's log-normalised raw: log1p(counts / n_counts * 1e4) gives it back
    import scanpy as sc

    raw = sc.datasets.pbmc68k_reduced().raw.X.toarray()
    back = np.log1p(X / pbmc.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(back, raw, atol=0.05)


def test_demo_command_prints_every_loss_and_writes_files(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--max-epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "study B called its" in result.output and "T cells only 'T cell'" in result.output
    lines = [line for line in result.output.splitlines() if "hierarchy-corrected 0." in line]
    assert [line.split("  ")[1].strip() for line in lines] == [
        "schce default (hce-aware)",
        "published HCE",
        "cross-entropy (CE)",
    ]
    assert all(re.search(r"exact 0\.\d{3}   hierarchy-corrected 0\.\d{3}$", line) for line in lines)
    adata = ad.read_h5ad(out / "pbmc68k_schce.h5ad")
    # the default loss writes the plain keys, the others their own
    assert {"schce_prediction", "schce_hce_prediction", "schce_ce_prediction"} <= set(adata.obs)
    assert "X_umap" in adata.obsm
    assert (out / "umap_predictions.png").stat().st_size > 10_000


def test_version_and_errors_are_one_line(tmp_path, monkeypatch, capsys):
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and schce.__version__ in result.output
    from schce import cli as cli_module

    monkeypatch.setattr("sys.argv", ["schce", "demo", "--max-epochs", "-1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_info:  # main() must exit non-zero, never return normally
        cli_module.main()
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None) and "Error" in err and "max-epochs" in err and "Traceback" not in err
