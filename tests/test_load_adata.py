"""``HCEClassifier.load(dir, adata)``: scvi-tools' load signature, with the data checked against the model."""

from __future__ import annotations

import numpy as np
import pytest

import schce


def test_load_attaches_data_with_the_models_genes(trained, pbmc, tmp_path):
    trained.save(tmp_path / "m")
    query = pbmc.copy()  # not registered: load registers it with the saved set-up arguments
    model = schce.HCEClassifier.load(tmp_path / "m", query, accelerator="cpu")
    assert model.adata is query
    assert model.hierarchy.labels == trained.hierarchy.labels
    assert model.registry_["schce"]["genes"] == trained.genes
    default = model.predict(inplace=False)
    explicit = trained.predict(pbmc.copy(), inplace=False)
    np.testing.assert_allclose(default["schce_confidence"], explicit["schce_confidence"], rtol=1e-5, atol=1e-6)
    assert (default["schce_prediction"] == explicit["schce_prediction"]).all()


def test_load_refuses_data_with_other_genes(trained, pbmc, tmp_path):
    trained.save(tmp_path / "m")
    other = pbmc[:, ::-1].copy()
    with pytest.raises(ValueError, match="genes are not the model's"):
        schce.HCEClassifier.load(tmp_path / "m", other, accelerator="cpu")
    assert "_scvi_uuid" not in other.uns  # checked before anything was registered


def test_load_rejects_an_unknown_accelerator(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(ValueError, match="accelerator must be"):
        schce.HCEClassifier.load(tmp_path / "m", accelerator="tpu")


def test_setup_state_is_typed_and_saved_as_before(trained, tmp_path):
    import json

    state = trained.setup_state
    assert state.genes == trained.genes and state.gene_id_type == "gene symbols"  # the bundled PBMCs use symbols
    assert schce.Hierarchy.from_dict(state.hierarchy).labels == trained.hierarchy.labels
    # the registry section keeps the keys models were saved with (optional ones only when set)
    assert set(trained.registry_["schce"]) == {
        "label_map",
        "hierarchy",
        "genes",
        "gene_id_type",
        "normalize",
        "ontology_source",
        "expression",  # what the training values looked like (raw counts here)
    }
    assert state.expression == "counts"
    trained.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "schce.json").read_text())["registry"]["schce"]
    assert saved["genes"] == trained.genes and saved["normalize"] == state.normalize
    loaded = schce.HCEClassifier.load(tmp_path / "m", accelerator="cpu").setup_state
    assert schce.Hierarchy.from_dict(loaded.hierarchy).labels == trained.hierarchy.labels
    for name in ("label_map", "genes", "gene_id_type", "normalize", "ontology_source", "expression", "fine_tuning"):
        assert getattr(loaded, name) == getattr(state, name), name
