"""``HCEClassifier.load(dir, adata)``: scvi-tools' load signature, with the data checked against the model."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import schce


def test_load_attaches_data_with_the_models_genes(trained, pbmc, tmp_path):
    trained.save(tmp_path / "m")
    query = pbmc.copy()  # not registered: load registers it with the saved set-up arguments
    model = schce.HCEClassifier.load(tmp_path / "m", query, accelerator="cpu")
    assert model.adata is query
    assert model.hierarchy.labels == trained.hierarchy.labels
    assert model.setup_state.genes == trained.genes
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
    # the model holds its own set-up; scvi-tools' registry keeps only the registered fields and set-up arguments
    assert "schce" not in trained.registry_ and trained.registry_["setup_args"]["labels_key"]
    assert set(state.to_dict()) == {
        "label_map",
        "hierarchy",
        "genes",
        "gene_id_type",
        "normalize",
        "ontology_source",
        "expression",  # what the training values looked like (raw counts here)
    }
    assert state.expression == "counts"
    state.genes.append("edited")  # a copy: the model's own state is unchanged
    assert trained.setup_state.genes == trained.genes
    trained.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "schce.json").read_text())
    assert meta["format_version"] == 3 and "schce" not in meta["registry"]
    assert meta["setup"]["genes"] == trained.genes and meta["setup"]["normalize"] == state.normalize
    loaded = schce.HCEClassifier.load(tmp_path / "m", accelerator="cpu").setup_state
    assert schce.Hierarchy.from_dict(loaded.hierarchy).labels == trained.hierarchy.labels
    for name in ("label_map", "genes", "gene_id_type", "normalize", "ontology_source", "expression", "fine_tuning"):
        assert getattr(loaded, name) == getattr(trained.setup_state, name), name


def test_a_model_saved_in_format_2_loads_and_predicts_as_saved(pbmc, tmp_path):
    """tests/data/model_format2 was saved by schce before the set-up left the registry (format 2)."""
    import json
    import shutil

    fixture = Path(__file__).parent / "data" / "model_format2"
    meta = json.loads((fixture / "schce.json").read_text())
    assert meta["format_version"] == 2 and "schce" in meta["registry"] and "setup" not in meta
    model = schce.HCEClassifier.load(fixture, accelerator="cpu")
    assert model.setup_state.genes == meta["registry"]["schce"]["genes"] and "schce" not in model.registry_
    assert model.registry_["setup_args"]["batch_key"] == "batch"
    query = pbmc[:120, :60].copy()  # the cells and genes it was trained on
    model.predict(query)
    expected = np.load(Path(__file__).parent / "data" / "model_format2_probabilities.npy")
    np.testing.assert_allclose(query.obsm["schce_probabilities"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # attached as scvi-tools does, then saved again in today's format
    cells = pbmc[:120, :60].copy()
    cells.obs["batch"] = np.where(np.arange(cells.n_obs) % 2 == 0, "a", "b")  # as at training
    attached = schce.HCEClassifier.load(fixture, cells, accelerator="cpu")
    assert attached.adata is not None and attached.setup_state.label_map == model.setup_state.label_map
    shutil.copytree(fixture, tmp_path / "old")
    model.save(tmp_path / "old", overwrite=True)
    again = json.loads((tmp_path / "old" / "schce.json").read_text())
    assert again["format_version"] == 3 and again["setup"] == meta["registry"]["schce"]


def test_a_model_built_from_files_has_a_registry_without_fields(tmp_path):
    """A store model needs no placeholder AnnData; data can be attached only to a model set up on data."""
    import json

    from schce.data import write_sctab_store

    model = _store_model(tmp_path, write_sctab_store)
    assert model.registry_["field_registries"] == {} and model.registry_["setup_method_name"] == "from_sctab_store"
    assert model.adata is None and model.setup_state.sctab_store == str(tmp_path / "store")
    assert model.setup_state.expression is None and model.setup_state.normalize
    model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m", accelerator="cpu")
    as_json = [json.loads(json.dumps(m.setup_state.to_dict())) for m in (loaded, model)]
    assert as_json[0] == as_json[1] and loaded.hierarchy.labels == model.hierarchy.labels
    cells = anndata.AnnData(np.ones((3, len(model.genes)), dtype=np.float32), var=pd.DataFrame(index=model.genes))
    with pytest.raises(ValueError, match=r"built from files \(from_sctab_store\).*Load it without adata"):
        schce.HCEClassifier.load(tmp_path / "m", cells, accelerator="cpu")


def _store_model(tmp_path, write_sctab_store):
    atlas = schce.datasets.simulate_atlas(300, n_genes=40, n_cell_types=4, library_size=200, seed=0, progress=False)
    write_sctab_store(atlas, tmp_path / "store", test_size=0.0, validation_size=0.0)
    return schce.HCEClassifier.from_sctab_store(tmp_path / "store", n_hidden=8, n_layers=1)
