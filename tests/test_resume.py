"""Checkpoints and resume: an interrupted run, resumed from its last checkpoint, ends with identical weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL_MLP, Crash, CrashAfter

import schce


def _train(adata, **kwargs):
    model = schce.HCEClassifier(adata, **SMALL_MLP)  # dropout 0.2: the RNG state matters too
    model.train(max_epochs=2, seed=0, enable_progress_bar=False, **kwargs)
    return model


@pytest.fixture(scope="module")
def registered(pbmc):
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    return adata


@pytest.fixture(scope="module")
def reference(registered, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    return _train(registered, checkpoint_dir=directory, checkpoint_every_n_steps=10), directory


def _assert_same(a, b, resumed_epoch: int | None = None):
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        # Bitwise, one process: resuming after a kill continues exactly as the uninterrupted run.
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    assert a.best_epoch_ == b.best_epoch_
    assert a.temperature_ == b.temperature_
    assert a.history_.keys() == b.history_.keys()
    for key in a.history_:
        ha, hb = a.history_[key], b.history_[key]
        if key.startswith("train") and resumed_epoch is not None:
            # Lightning averages an epoch's training loss over the batches it ran: after a mid-epoch resume, only
            # those after the checkpoint. Everything that trains the model is identical (weights, validation).
            ha, hb = ha.drop(index=resumed_epoch), hb.drop(index=resumed_epoch)
        np.testing.assert_array_equal(ha.to_numpy(), hb.to_numpy())


# 630 training cells in batches of 39: 17 steps per epoch; step 25 is in the middle of the second epoch.
@pytest.mark.parametrize("every_n_steps", [10, None], ids=["mid-epoch", "epoch-end"])
def test_resume_after_interruption_gives_identical_weights(registered, reference, tmp_path, every_n_steps):
    ref, ref_dir = reference
    assert (ref_dir / "last.ckpt").is_file() and (ref_dir / "best.ckpt").is_file()
    with pytest.raises(Crash):
        _train(registered, checkpoint_dir=tmp_path, checkpoint_every_n_steps=every_n_steps, callbacks=[CrashAfter(25)])
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == (20 if every_n_steps else 17)  # the resume really starts mid-way
    assert saved["schce_target_masks"].dtype == torch.bool  # hce-aware: the run's masks travel with it
    # A new model object, as in a new process after the crash.
    resumed = _train(registered, checkpoint_dir=tmp_path, checkpoint_every_n_steps=every_n_steps, ckpt_path="last")
    _assert_same(ref, resumed, resumed_epoch=1 if every_n_steps else None)


def test_checkpoint_arguments_are_checked_first(registered, tmp_path):
    model = schce.HCEClassifier(registered, **SMALL_MLP)
    with pytest.raises(ValueError, match="pass checkpoint_dir"):
        model.train(max_epochs=1, ckpt_path="last")
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        model.train(max_epochs=1, checkpoint_dir=tmp_path, ckpt_path="last")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.train(max_epochs=1, ckpt_path=tmp_path / "missing.ckpt")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        model.train(max_epochs=1, checkpoint_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        model.train(max_epochs=1, checkpoint_every_n_steps=5)
    assert not model.is_trained_ and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_resume_refuses_a_different_run(registered, reference):
    _, ref_dir = reference
    model = schce.HCEClassifier(registered, **SMALL_MLP)
    with pytest.raises(ValueError, match="different training run"):
        model.train(max_epochs=2, seed=1, checkpoint_dir=ref_dir, ckpt_path="last", enable_progress_bar=False)
