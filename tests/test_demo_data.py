"""The mixed-granularity reference the demo trains on."""

from __future__ import annotations

import numpy as np
from _private import PBMC68K_T_CELLS, T_CELL, mix_granularity


def test_mix_granularity_coarsens_only_the_coarse_study(pbmc):
    mixed = mix_granularity(pbmc, PBMC68K_T_CELLS, T_CELL, seed=3)
    truth = pbmc.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    ann = mixed.obs["annotation"].to_numpy()
    coarse = (mixed.obs["study"] == "study B (coarse)").to_numpy()
    is_t = np.isin(truth, PBMC68K_T_CELLS)
    assert 0.4 < coarse.mean() < 0.6
    assert (ann[coarse & is_t] == T_CELL).all() and (coarse & is_t).sum() > 50
    np.testing.assert_array_equal(ann[~(coarse & is_t)], truth[~(coarse & is_t)])
    assert "annotation" not in pbmc.obs and (mixed.obs["cell_type_ontology_term_id"].astype(str) == truth).all()
    again = mix_granularity(pbmc, PBMC68K_T_CELLS, T_CELL, seed=3)
    np.testing.assert_array_equal(again.obs["annotation"].to_numpy(), ann)
