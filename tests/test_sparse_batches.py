"""Sparse (CSR) batches from every loader, their densification, the in-place preprocessing and the input dropout."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _private import csr_batch, gene_moments, make_loader, split_cells
from torch.utils.data import DataLoader

import schce
from schce.data import (
    AnnDataModule,
    GeneAligner,
    SCTabStoreDataModule,
    StoreDataset,
    convert_sctab_store,
    read_sctab_store,
    write_sctab_store,
)
from schce.nn import MLP, Densifier, HCEModule, densify

from .conftest import SMALL_MLP

N_GENES = 200


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    atlas = schce.datasets.simulate_atlas(
        1500, n_genes=N_GENES, n_cell_types=8, library_size=300, seed=3, progress=False
    )
    root = tmp_path_factory.mktemp("sparse")
    dense = write_sctab_store(atlas, root / "dense", split_key="donor_id", rows_per_part=1024)
    return {"dense": dense, "compact": convert_sctab_store(dense, root / "compact")}


def _batches(path, batch_format, split="train", num_workers=0, shuffle=True):
    ds = StoreDataset(path, split, 128, shuffle=shuffle, seed=4, buffer_size=2, batch_format=batch_format)
    ds.next_epoch()
    return list(DataLoader(ds, batch_size=None, num_workers=num_workers))


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_store_sparse_batches_densify_to_the_dense_batches(stores, layout):
    sparse, dense = _batches(stores[layout], "sparse"), _batches(stores[layout], "dense")
    assert len(sparse) == len(dense) > 3
    for s, d in zip(sparse, dense, strict=True):
        assert "x" not in s and tuple(s["x_shape"]) == tuple(d["x"].shape) and s["x_indices"].dtype == torch.int32
        assert set(s) - {"x_indptr", "x_indices", "x_values", "x_shape"} == set(d) - {"x"}
        np.testing.assert_array_equal(densify(s).numpy(), d["x"].numpy())  # exactly the same values
        np.testing.assert_array_equal(s["idx"].numpy(), d["idx"].numpy())
        assert int(s["x_indptr"][-1]) == int((d["x"] != 0).sum())  # no stored zeros
    # "auto": sparse for the compact layout, dense for the published dense one.
    assert StoreDataset(stores["compact"], "train", 64, shuffle=False).sparse
    assert not StoreDataset(stores["dense"], "train", 64, shuffle=False).sparse


def test_sparse_batches_collate_through_loader_workers(stores):
    one = _batches(stores["compact"], "sparse", shuffle=False)  # every cell (no single-cell batch is dropped)
    two = _batches(stores["compact"], "sparse", num_workers=2, shuffle=False)
    # Each worker reads its own row groups: the same cells, in another order.
    assert sum(b["x_shape"][0] for b in two) == sum(b["x_shape"][0] for b in one)
    got = {int(i): row for b in two for i, row in zip(b["idx"], densify(b).numpy(), strict=True)}
    for b in one:
        for i, row in zip(b["idx"], densify(b).numpy(), strict=True):
            np.testing.assert_array_equal(got[int(i)], row)


def test_anndata_loader_sparse_batches_with_gene_alignment():
    rng = np.random.default_rng(0)
    X = sp.random(90, 30, density=0.2, format="csr", random_state=1, dtype=np.float64) * 10
    model_genes = [f"g{i}" for i in (5, 2, 40, 7, 0, 29)]  # g40 is not in the query
    aligner = GeneAligner(model_genes, [f"g{i}" for i in range(30)])
    rows = rng.permutation(90)[:70]
    sparse = list(make_loader(X, rows, 16, aligner=aligner, batch_format="sparse"))
    dense = list(make_loader(X, rows, 16, aligner=aligner, batch_format="dense"))
    assert all("x_values" in b for b in sparse) and all("x" in b for b in dense)
    for s, d in zip(sparse, dense, strict=True):
        np.testing.assert_array_equal(densify(s).numpy(), d["x"].numpy())
    # "auto" is sparse for a scipy matrix, dense for an array; "sparse" on an array is an error naming the fix.
    assert "x_values" in next(iter(make_loader(X, rows, 16)))
    assert "x" in next(iter(make_loader(X.toarray(), rows, 16)))
    with pytest.raises(ValueError, match="batch_format='auto' or 'dense'"):
        make_loader(X.toarray(), rows, 16, batch_format="sparse")
    with pytest.raises(ValueError, match="batch_format must be one of"):
        make_loader(X, rows, 16, batch_format="csr")


def test_densifier_reuses_one_zeroed_buffer():
    dense = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    other = torch.tensor([[5.0, 0.0, 0.0]])

    def as_batch(x):
        m = sp.csr_matrix(x.numpy())
        return {
            "x_indptr": torch.as_tensor(m.indptr, dtype=torch.int64),
            "x_indices": torch.as_tensor(m.indices, dtype=torch.int32),
            "x_values": torch.as_tensor(m.data),
            "x_shape": m.shape,
        }

    densifier = Densifier()
    first = densifier(as_batch(dense))
    torch.testing.assert_close(first, dense, rtol=0, atol=0)
    ptr = first.data_ptr()
    second = densifier(as_batch(other))
    assert second.data_ptr() == ptr  # the same memory, zeroed: nothing of the first batch is left
    torch.testing.assert_close(second, other, rtol=0, atol=0)
    kept = {"x": dense}
    assert densifier(kept) is dense  # dense batches pass through


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_densifier_compiled_scatter_matches_numpy_and_checks_indices(dtype):
    """The CPU scatter (compiled for float32/64, numpy for other types) writes every entry; the compiled one checks
    the gene indices (numpy's flat scatter would write an index past the row into the next row)."""
    m = sp.random(300, 500, density=0.1, format="csr", random_state=0, dtype=np.float64)
    m.data = np.round(m.data * 100)  # exact in float16 too
    m.data[m.indptr[7] : m.indptr[8]] = 0  # an empty row
    m.eliminate_zeros()
    batch = {
        "x_indptr": torch.as_tensor(m.indptr, dtype=torch.int64),
        "x_indices": torch.as_tensor(m.indices, dtype=torch.int32),
        "x_values": torch.as_tensor(m.data).to(dtype),
        "x_shape": m.shape,
    }
    got = Densifier()(batch)
    torch.testing.assert_close(got, torch.as_tensor(m.toarray(), dtype=torch.float32), rtol=0, atol=0)
    if dtype == torch.float16:
        return
    bad = {**batch, "x_indices": batch["x_indices"].clone()}
    bad["x_indices"][5] = 500
    with pytest.raises(IndexError):
        Densifier()(bad)


def test_gene_moments_from_sparse_values_match_the_dense_pass():
    X = sp.random(300, 40, density=0.15, format="csr", random_state=2, dtype=np.float32) * 20
    X[5] = 0  # a cell with no counts
    rows = np.arange(300)
    for normalize in (True, False):
        sparse = gene_moments(make_loader(X, rows, 64, batch_format="sparse"), normalize)
        dense = gene_moments(make_loader(X, rows, 64, batch_format="dense"), normalize)
        assert sparse[2] == dense[2] == 300
        for a, b in zip(sparse[:2], dense[:2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_in_place_preprocessing_equals_the_plain_forward():
    torch.manual_seed(0)
    module = HCEModule(MLP(25, 3, n_hidden=8, n_layers=1)).eval()
    module.set_input_scaling(torch.rand(25), torch.rand(25) + 0.1)
    x = torch.poisson(torch.rand(10, 25) * 5)
    x[3] = 0
    want = module(x.clone())
    buffer = x.clone()
    got = module(buffer, inplace=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A tensor that needs gradients is never overwritten.
    leaf = x.clone().requires_grad_(True)
    module(leaf, inplace=True)
    torch.testing.assert_close(leaf.detach(), x, rtol=0, atol=0)


def test_in_place_input_dropout_trains_the_same_function():
    """The MLP's input dropout in the batch buffer: the same mask, values, logits and gradients as out of place."""
    x = torch.poisson(torch.rand(64, 40) * 5)
    runs = []
    for inplace in (False, True):
        torch.manual_seed(0)
        module = HCEModule(MLP(40, 3, n_hidden=16, n_layers=2, dropout=0.2, input_dropout=0.3)).train()
        module.set_input_scaling(torch.rand(40), torch.rand(40) + 0.1)
        torch.manual_seed(1)
        logits, h = module(x.clone(), inplace=inplace)
        logits.logsumexp(1).sum().backward()
        runs.append([logits, h, *(p.grad for p in module.parameters())])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer = MLP(40, 3, input_dropout=0.3).input_dropout.train()
    buffer = x.clone()
    torch.manual_seed(2)
    want = layer(x)
    torch.manual_seed(2)
    assert layer(buffer, inplace=True) is buffer
    torch.testing.assert_close(buffer, want, rtol=0, atol=0)


def test_input_dropout_rate_scale_and_seeded_repeatability():
    layer = MLP(400, 2, input_dropout=0.3).input_dropout
    layer.train()
    x = torch.ones(500, 400)
    torch.manual_seed(7)
    a = layer(x)
    torch.manual_seed(7)
    b = layer(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = (a == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.01  # 200,000 draws: the standard error is 0.001
    np.testing.assert_allclose(a[a != 0].numpy(), 1 / (1 - round(0.3 * 2**16) / 2**16), rtol=1e-6)
    torch.testing.assert_close(a.mean(), torch.tensor(1.0), rtol=0, atol=0.01)  # the expected input is kept
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match="input_dropout must be in"):
        MLP(4, 2, input_dropout=1.0)


def test_training_on_sparse_batches_equals_dense_batches(stores):
    states = []
    for batch_format in ("sparse", "dense"):
        dm = SCTabStoreDataModule(stores["compact"], batch_size=128, num_workers=0, seed=0, batch_format=batch_format)
        model = schce.HCEClassifier.from_sctab_store(stores["compact"], **SMALL_MLP)
        model.train(datamodule=dm, max_epochs=2, seed=0, enable_progress_bar=False)
        states.append(model.module.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(v, states[1][k], rtol=1e-5, atol=1e-6)


def test_anndata_module_trains_the_same_on_sparse_and_dense_batches(stores):
    test = read_sctab_store(stores["compact"], "train", decode=False)
    codes = test.obs["cell_type"].to_numpy()
    train, val, _ = split_cells(codes, 0.2, 0.0, 0)
    states = []
    for X in (test.X, test.X.toarray()):
        # Without the gene scaling, whose sparse and dense sums differ in the last bits (compared above), which
        # AdamW turns into visible differences of weights whose gradients are near zero.
        model = schce.HCEClassifier.from_sctab_store(stores["compact"], standardize=False, **SMALL_MLP)
        dm = AnnDataModule(X, codes, model.hierarchy.labels, train, val, batch_size=64, seed=0)
        assert ("x_values" in next(iter(dm.train_dataloader()))) == sp.issparse(X)
        model.train(datamodule=dm, max_epochs=2, seed=0, enable_progress_bar=False)
        states.append(model.module.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(v, states[1][k], rtol=1e-5, atol=1e-6)


def test_parallel_conversion_writes_the_serial_bytes(stores, tmp_path):
    parallel = convert_sctab_store(stores["dense"], tmp_path / "parallel", n_jobs=2)
    serial = stores["compact"]
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    parts = [f for f in files if f.suffix == ".parquet" and f.parts[0] in ("train", "val", "test")]
    assert len(parts) >= 3
    for f in files:
        assert (serial / f).read_bytes() == (parallel / f).read_bytes(), f
    with pytest.raises(ValueError, match="n_jobs must be"):
        convert_sctab_store(stores["dense"], tmp_path / "bad", n_jobs=0)
    assert not (tmp_path / "bad").exists()


def test_csr_rows_with_empty_rows_anywhere():
    from schce.nn._batch import csr_rows

    for lengths in ([0, 3, 0, 0, 2, 1, 0], [4], [0, 0], [1, 0, 5]):
        indptr = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
        want = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths))
        torch.testing.assert_close(csr_rows(indptr, len(lengths)), want, rtol=0, atol=0)


def test_csr_batch_keeps_tensors_of_its_dtypes_and_converts_the_rest():
    """A store worker writes a batch into shared memory: csr_batch must send those tensors on, not copies of them."""
    indptr, indices, values = np.array([0, 2, 3]), torch.tensor([4, 1, 0], dtype=torch.int32), torch.ones(3)
    batch = csr_batch(indptr, indices, values, 5)
    assert batch["x_indices"].data_ptr() == indices.data_ptr() and batch["x_values"].data_ptr() == values.data_ptr()
    assert batch["x_indptr"].dtype == torch.int64 and batch["x_shape"] == (2, 5)
    other = csr_batch(indptr, np.array([4, 1, 0], dtype=np.int64), np.array([1, 2, 3], dtype=np.float16), 5)
    assert other["x_indices"].dtype == torch.int32 and other["x_values"].dtype == torch.float32
    torch.testing.assert_close(other["x_values"], torch.tensor([1.0, 2.0, 3.0]), rtol=0, atol=0)
    np.testing.assert_array_equal(densify(other).numpy(), [[0, 2, 0, 0, 1], [3, 0, 0, 0, 0]])
