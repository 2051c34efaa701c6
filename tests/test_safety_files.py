"""Issue 24: saving never loses the user's files, and a damaged or edited model file is refused on load."""

from __future__ import annotations

import json

import pytest
import torch

import schce
from schce import _io


def _meta(path):
    return json.loads((path / "schce.json").read_text())


def _write_meta(path, meta):
    (path / "schce.json").write_text(json.dumps(meta))


def test_overwrite_refuses_a_directory_with_the_users_files(trained, tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "figures").mkdir()
    with pytest.raises(FileExistsError, match=r"did not write \(figures/, notes.txt\)"):
        trained.save(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine" and (target / "figures").is_dir()
    assert sorted(p.name for p in target.iterdir()) == ["figures", "notes.txt"]  # nothing written, nothing lost


def test_overwrite_replaces_a_schce_model_directory_and_an_empty_one(trained, tmp_path):
    target = tmp_path / "model"
    trained.save(target, save_anndata=True)
    trained.save(target, overwrite=True)  # only schce's own files were there
    assert sorted(p.name for p in target.iterdir()) == ["model.pt", "schce.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    trained.save(empty, overwrite=True)
    assert (empty / "model.pt").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_overwrite_refuses_an_existing_regular_file(trained, tmp_path):
    target = tmp_path / "model"
    target.write_text("a file the user keeps")
    with pytest.raises(FileExistsError, match="is not a directory"):
        trained.save(target, overwrite=True)
    assert target.read_text() == "a file the user keeps"


def test_generic_atomic_writes_keep_foreign_entries(tmp_path):
    target = tmp_path / "store"
    target.mkdir()
    (target / "user.csv").write_text("x")

    def write(tmp):
        (tmp / "var.parquet").write_text("new")

    with pytest.raises(FileExistsError, match=r"user.csv"):
        _io.write_dir_atomically(target, True, write)
    assert sorted(p.name for p in target.iterdir()) == ["user.csv"]
    (target / "user.csv").unlink()
    (target / "var.parquet").write_text("old")
    _io.write_dir_atomically(target, True, write)  # what the writer writes may be replaced
    assert (target / "var.parquet").read_text() == "new"


def test_cli_train_overwrite_keeps_the_users_files(tmp_path, pbmc):
    from click.testing import CliRunner

    from schce.cli import cli

    h5ad = tmp_path / "in.h5ad"
    pbmc.write_h5ad(h5ad)
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.ipynb").write_text("{}")
    args = ["train", str(h5ad), "--labels-key", "cell_type_ontology_term_id", "--out", str(out), "--overwrite"]
    result = CliRunner().invoke(cli, [*args, "--max-epochs", "1", "--no-progress"])
    assert result.exit_code != 0
    assert "analysis.ipynb" in result.output and "did not write" in result.output
    assert "Training" not in result.output  # refused before any work
    assert sorted(p.name for p in out.iterdir()) == ["analysis.ipynb"]


@pytest.fixture
def saved(trained, tmp_path):
    path = tmp_path / "model"
    trained.save(path)
    return path


def test_saved_metadata_holds_checksums_and_round_trips(saved, trained):
    sums = _meta(saved)["checksums"]
    assert set(sums) == {"weights", "labels", "genes", "hierarchy"} and all(len(v) == 64 for v in sums.values())
    from schce._model_file import file_sha256

    assert sums["weights"] == file_sha256(saved / "model.pt")
    loaded = schce.HCEClassifier.load(saved)
    assert loaded.hierarchy.labels == trained.hierarchy.labels and loaded.genes == trained.genes


def test_flipped_bytes_in_the_weights_are_refused(saved):
    data = bytearray((saved / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.pt does not match the checksum .* damaged or replaced"):
        schce.HCEClassifier.load(saved)


def test_weights_of_another_model_with_the_same_shapes_are_refused(saved):
    state = torch.load(saved / "model.pt", weights_only=True)
    torch.save({k: v.clone() + 1 if v.is_floating_point() else v for k, v in state.items()}, saved / "model.pt")
    with pytest.raises(ValueError, match="replaced by another model's"):
        schce.HCEClassifier.load(saved)


@pytest.mark.parametrize("which", ["labels", "genes"])
def test_a_reversed_label_or_gene_list_is_refused(saved, which):
    meta = _meta(saved)
    setup = meta["setup"]
    if which == "labels":
        setup["hierarchy"]["labels"] = setup["hierarchy"]["labels"][::-1]
    else:
        setup["genes"] = setup["genes"][::-1]
    _write_meta(saved, meta)
    with pytest.raises(ValueError, match=f"The {which} in .*schce.json differ from those the model was saved with"):
        schce.HCEClassifier.load(saved)


@pytest.mark.parametrize(
    ("value", "shown"), [(0, "0"), (-1.5, "-1.5"), ("1.0", "'1.0'"), (None, "None"), (True, "True")]
)
def test_bad_temperature_is_refused(saved, value, shown):
    meta = _meta(saved)
    meta["temperature"] = value
    _write_meta(saved, meta)
    with pytest.raises(ValueError, match=f"temperature must be a positive finite number, got {shown}"):
        schce.HCEClassifier.load(saved)


@pytest.mark.parametrize("key", ["registry", "setup", "init_params", "temperature", "history"])
def test_missing_required_keys_are_named(saved, key):
    meta = _meta(saved)
    del meta[key]
    _write_meta(saved, meta)
    with pytest.raises(ValueError, match=f"lacks the required field\\(s\\) {key}"):
        schce.HCEClassifier.load(saved)


def test_bad_nested_fields_are_named(saved):
    meta = _meta(saved)
    del meta["setup"]["hierarchy"]
    _write_meta(saved, meta)
    with pytest.raises(ValueError, match=r"setup.hierarchy must be an object, got None"):
        schce.HCEClassifier.load(saved)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("train_indices", [0, -3], "train_indices must be null or a list of non-negative integers"),
        ("is_trained", "yes", "is_trained must be true or false"),
        ("best_epoch", 1.5, "best_epoch must be null or an epoch number"),
        ("checksums", {"weights": "abc"}, "checksums must be an object of sha256 hex digests"),
    ],
)
def test_bad_field_values_are_named(saved, field, value, message):
    meta = _meta(saved)
    meta[field] = value
    _write_meta(saved, meta)
    with pytest.raises(ValueError, match=message):
        schce.HCEClassifier.load(saved)


def test_files_from_format_1_load_with_a_warning(saved, trained, caplog):
    meta = _meta(saved)
    del meta["checksums"]
    meta["format_version"] = 1
    meta["registry"]["schce"] = meta.pop("setup")  # where formats 1 and 2 kept the set-up
    _write_meta(saved, meta)
    with caplog.at_level("WARNING", logger="schce"):
        loaded = schce.HCEClassifier.load(saved)
    assert "cannot be verified" in caplog.text
    assert loaded.hierarchy.labels == trained.hierarchy.labels and loaded.is_trained_


@pytest.mark.parametrize("content", ["empty", "truncated"])
def test_an_empty_or_truncated_resume_checkpoint_is_named(pbmc, tmp_path, content):
    ckpt = tmp_path / "last.ckpt"
    if content == "empty":
        ckpt.write_bytes(b"")
    else:
        torch.save({"state_dict": {"w": torch.ones(50, 50)}, "epoch": 1}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:3000])
    adata = pbmc[:80].copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, n_hidden=8, n_layers=1)
    expected = "is empty \\(0 bytes\\)" if content == "empty" else "is truncated or is not a PyTorch checkpoint"
    with pytest.raises(ValueError, match=f"ckpt_path='.*last.ckpt' .*{expected}"):
        model.train(max_epochs=1, ckpt_path=ckpt, enable_progress_bar=False)
    assert not model.is_trained_


def test_a_failed_save_leaves_the_old_model_intact(trained, tmp_path, monkeypatch):
    target = tmp_path / "model"
    trained.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trained.save(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left behind


def test_models_saved_with_prefixes_share_a_folder_and_keep_the_users_files(trained, tmp_path):
    """scvi-tools' ``save(dir, prefix=...)`` / ``load(dir, prefix=...)``: only the prefix's own files are written."""
    from pathlib import Path

    other = schce.HCEClassifier.load(Path(__file__).parent / "data" / "model_format2", accelerator="cpu")
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    trained.save(folder, prefix="pbmc_", save_anndata=True)
    other.save(folder, prefix="small_")  # no overwrite needed: none of its files exist yet
    assert sorted(p.name for p in folder.iterdir()) == [
        "notes.txt",
        "pbmc_adata.h5ad",
        "pbmc_model.pt",
        "pbmc_schce.json",
        "small_model.pt",
        "small_schce.json",
    ]
    a = schce.HCEClassifier.load(folder, prefix="pbmc_", accelerator="cpu")
    b = schce.HCEClassifier.load(folder, accelerator="cpu", prefix="small_")
    assert a.genes == trained.genes and a.hierarchy.labels == trained.hierarchy.labels
    assert b.genes == other.genes and b.hierarchy.labels == other.hierarchy.labels
    for name, value in trained.module.state_dict().items():
        torch.testing.assert_close(a.module.state_dict()[name], value.cpu(), rtol=0, atol=0)

    before = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith("pbmc_")}
    with pytest.raises(FileExistsError, match=r"already holds pbmc_adata.h5ad, pbmc_model.pt, pbmc_schce.json"):
        trained.save(folder, prefix="pbmc_")
    trained.save(folder, prefix="pbmc_", overwrite=True)  # replaces that prefix's files, the old AnnData included
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith("pbmc_")} == before
    assert sorted(p.name for p in folder.glob("pbmc_*")) == ["pbmc_model.pt", "pbmc_schce.json"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert schce.HCEClassifier.load(folder, prefix="pbmc_").hierarchy.labels == trained.hierarchy.labels
    # the folder as a whole is still not schce's to replace
    with pytest.raises(FileExistsError, match="did not write"):
        trained.save(folder, overwrite=True)


def test_a_missing_or_bad_prefix_is_named(trained, tmp_path):
    trained.save(tmp_path, prefix="a_", overwrite=True)
    with pytest.raises(ValueError, match=r"expected b_schce.json and b_model.pt.*models of prefix 'a_'"):
        schce.HCEClassifier.load(tmp_path, prefix="b_")
    with pytest.raises(ValueError, match=r"expected schce.json and model.pt.*models of prefix 'a_'"):
        schce.HCEClassifier.load(tmp_path)
    for bad in ("../up_", ".hidden_", 3):
        with pytest.raises(ValueError, match="prefix must be a file-name prefix"):
            trained.save(tmp_path / "x", prefix=bad)
    assert not (tmp_path / "x").exists()
