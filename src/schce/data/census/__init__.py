"""Cells from the CZ CELLxGENE Discover Census: out-of-distribution datasets, query AnnData and streaming training.

Needs the ``census`` extra (``pip install 'schce[census]'``: ``cellxgene-census``, ``tiledbsoma``,
``tiledbsoma-ml``). Every function takes an *opened* census, so the same code reads the public release and any local
SOMA store in the census layout::

    import cellxgene_census
    from schce.data import census as sc_census

    with cellxgene_census.open_soma(census_version="2023-12-15") as census:
        adata = sc_census.get_query_anndata(census, model, obs_value_filter="tissue_general == 'lung'")

The census layout read here: a SOMA collection with ``census_data/<organism>`` experiments (measurement ``RNA``,
``X`` layer ``raw`` with integer counts, ``obs`` with ``cell_type_ontology_term_id``, ``assay``,
``is_primary_data``, ``dataset_id`` ..., ``var`` with ``feature_id`` (Ensembl) and ``feature_name`` (symbol)) and
a ``census_info/datasets`` dataframe.
"""

from schce.data.census._datamodule import CensusDataModule
from schce.data.census._query import get_query_anndata, ood_datasets
from schce.data.census._soma import SCTAB_ASSAYS

__all__ = ["SCTAB_ASSAYS", "CensusDataModule", "get_query_anndata", "ood_datasets"]
