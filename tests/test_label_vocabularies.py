"""Training on any label vocabulary: free-text labels through a reviewed mapping to CL, or the user's own hierarchy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import SMALL_MLP, shared_file

import schce
from schce.cli import cli
from schce.ontology import LabelMappingError

SYMPHONY = ("real", "symphony_pbmcs_small_3batches_counts_CL.h5ad")


@pytest.fixture(scope="module")
def symphony():
    return ad.read_h5ad(shared_file(*SYMPHONY))


def test_free_text_labels_train_through_a_proposed_mapping_and_score_against_the_cl_truth(symphony):
    ref = symphony[symphony.obs["batch"] != "5p"].copy()
    query = symphony[symphony.obs["batch"] == "5p"].copy()
    with pytest.raises(LabelMappingError, match="propose_label_mapping"):
        schce.HCEClassifier.setup_anndata(ref.copy(), labels_key="cell_type")
    proposal = schce.propose_label_mapping(ref.obs["cell_type"])
    assert set(proposal["how"]) <= {"ontology", "abbreviation"}  # nothing left to guess on these labels
    schce.HCEClassifier.setup_anndata(ref, labels_key="cell_type", label_mapping=proposal)
    model = schce.HCEClassifier(ref, **SMALL_MLP)
    # the mapping agrees with the curated CL column of the file, label by label
    curated = dict(
        zip(ref.obs["cell_type"].astype(str), ref.obs["cell_type_ontology_term_id"].astype(str), strict=True)
    )
    assert model.setup_state.label_map == curated
    model.train(max_epochs=15, seed=0, enable_progress_bar=False)
    model.predict(query)
    truth = query.obs["cell_type_ontology_term_id"].astype(str)
    accuracy = float(np.mean(query.obs["schce_prediction_ontology_term_id"].astype(str) == truth))
    assert accuracy > 0.6, accuracy
    # evaluate reads the free-text truth through the saved mapping: the same scores as the CL column
    by_text = model.evaluate(query, labels_key="cell_type", groupby=())
    by_id = model.evaluate(query, labels_key="cell_type_ontology_term_id", groupby=())
    pd.testing.assert_frame_equal(by_text.overall, by_id.overall)
    assert by_id["corrected_macro_f1"] > 0.3


def test_label_mapping_from_a_csv_in_the_cli(symphony, tmp_path):
    small = symphony[np.random.default_rng(0).permutation(symphony.n_obs)[:300]].copy()
    h5ad = tmp_path / "ref.h5ad"
    small.write_h5ad(h5ad)
    table = schce.propose_label_mapping(small.obs["cell_type"])
    table.loc[table["label"] == "DC", "ontology_term_id"] = "CL:0000784"  # the user edits a row: pDC
    table.to_csv(tmp_path / "mapping.csv", index=False)
    args = ["train", h5ad, "--labels-key", "cell_type", "--out", tmp_path / "model", "--max-epochs", 2,
            "--no-progress", "--n-hidden", 16, "--n-layers", 1,
            "--label-mapping", tmp_path / "mapping.csv"]  # fmt: skip
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    model = schce.HCEClassifier.load(tmp_path / "model")
    assert model.setup_state.label_map["DC"] == "CL:0000784"
    assert model.setup_state.label_map["T_CD4"] == "CL:0000624"
    missing = CliRunner().invoke(cli, [str(a) for a in [*args[:-1], tmp_path / "nope.csv"]])
    assert missing.exit_code != 0 and "nope.csv does not exist" in missing.output


def _toy(n_per_label: int = 40, seed: int = 0) -> ad.AnnData:
    """Counts whose genes 0-4 mark the 'lymphoid' branch, 5-9 'myeloid', and one gene per label its subtype."""
    rng = np.random.default_rng(seed)
    labels = ["T", "B", "Mono", "Macro"]
    X = rng.poisson(1.0, size=(n_per_label * len(labels), 20)).astype(np.float32)
    for i, label in enumerate(labels):
        rows = slice(i * n_per_label, (i + 1) * n_per_label)
        X[rows, 0:5] += 10 if label in ("T", "B") else 0
        X[rows, 5:10] += 10 if label in ("Mono", "Macro") else 0
        X[rows, 10 + i] += 30
    obs = pd.DataFrame({"kind": np.repeat(labels, n_per_label)}, index=[f"c{i}" for i in range(X.shape[0])])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))


def test_a_custom_hierarchy_trains_predicts_saves_and_scores_without_the_cell_ontology(tmp_path):
    adata = _toy()
    parents = {"T": "lymphoid", "B": "lymphoid", "Mono": ["myeloid"], "Macro": "myeloid", "lymphoid": "cell",
               "myeloid": ["cell"], "cell": None}  # fmt: skip
    with pytest.raises(ValueError, match=r"not in the hierarchy: \['Macro'\]"):
        schce.HCEClassifier.setup_anndata(
            adata.copy(), labels_key="kind", hierarchy={"T": None, "B": None, "Mono": None}
        )
    with pytest.raises(ValueError, match="not both"):
        schce.HCEClassifier.setup_anndata(adata.copy(), labels_key="kind", hierarchy=parents, label_mapping={})
    schce.HCEClassifier.setup_anndata(adata, labels_key="kind", hierarchy=parents)
    model = schce.HCEClassifier(adata, backbone="linear")  # L-BFGS converges on this toy; a short MLP run may not
    assert model.hierarchy.labels == ("B", "Macro", "Mono", "T")
    assert set(model.hierarchy.terms) == {"B", "Macro", "Mono", "T", "lymphoid", "myeloid", "cell"}
    assert model.hierarchy.parents("Mono") == ("myeloid",)
    model.train(max_epochs=30, seed=0, enable_progress_bar=False)
    query = _toy(seed=1)
    model.predict(query)
    assert set(query.obs["schce_prediction"].cat.categories) <= {"B", "Macro", "Mono", "T", "unassigned"}
    accuracy = float(np.mean(query.obs["schce_prediction"].astype(str) == query.obs["kind"]))
    assert accuracy > 0.9, accuracy
    # truth at a coarse term of the user's hierarchy is scored with the hierarchy rule (the root is never scorable)
    query.obs["coarse"] = np.where(query.obs["kind"].isin(["T", "B"]), "lymphoid", "myeloid")
    result = model.evaluate(query, labels_key="coarse", groupby=())
    assert result["corrected_accuracy"] > 0.9 and result.overall.loc["n_not_scorable", "value"] == 0
    model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m")
    assert loaded.hierarchy.to_dict() == model.hierarchy.to_dict()
    np.testing.assert_allclose(
        loaded.predict(query, inplace=False)["schce_confidence"].to_numpy(),
        query.obs["schce_confidence"].to_numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    attached = schce.HCEClassifier.load(tmp_path / "m", adata=_toy(seed=2))  # re-registered with the saved hierarchy
    assert set(attached.predict(inplace=False)["schce_prediction"].astype(str)) <= {"B", "Macro", "Mono", "T"}
    # a Hierarchy object works as well, and its extra terms (no cells) do not become labels
    h = schce.Hierarchy.from_edges([("cell", "lymphoid"), ("cell", "myeloid"), ("lymphoid", "T"), ("lymphoid", "B"),
                                    ("lymphoid", "NK"), ("myeloid", "Mono"), ("myeloid", "Macro")])  # fmt: skip
    other = _toy()
    schce.HCEClassifier.setup_anndata(other, labels_key="kind", hierarchy=h)
    assert schce.HCEClassifier(other, **SMALL_MLP).hierarchy.labels == ("B", "Macro", "Mono", "T")


def test_setup_mudata_takes_a_label_mapping(symphony):
    import mudata as md

    rna = symphony[:200].copy()
    mdata = md.MuData({"rna": rna})
    table = schce.propose_label_mapping(rna.obs["cell_type"])
    table.loc[table["label"] == "DC", "ontology_term_id"] = "CL:0000784"
    with pytest.raises(LabelMappingError, match="'NK'"):  # a partial mapping: the rest must be CL names
        schce.HCEClassifier.setup_mudata(
            mdata, "cell_type", modalities={"rna_layer": "rna", "labels_key": "rna"}, label_mapping={"DC": "CL:0000784"}
        )
    schce.HCEClassifier.setup_mudata(
        mdata, "cell_type", modalities={"rna_layer": "rna", "labels_key": "rna"}, label_mapping=table
    )
    model = schce.HCEClassifier(mdata, n_hidden=8, n_layers=1)
    assert model.setup_state.label_map["DC"] == "CL:0000784"  # the user's edit
    assert model.setup_state.label_map["B"] == "CL:0000236"
    assert model.registry_["setup_args"]["label_mapping"]["DC"] == "CL:0000784"
