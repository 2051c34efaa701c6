"""scTab stores: layouts and varint codec, writing and conversion, reading, and streaming into training."""

from schce.data.sctab._datamodule import SCTabStoreDataModule, StoreDataset
from schce.data.sctab._format import read_part_metadata
from schce.data.sctab._read import read_sctab_store
from schce.data.sctab._write import convert_sctab_store, write_sctab_store
from schce.hierarchy import compare_hierarchy

__all__ = [
    "SCTabStoreDataModule",
    "StoreDataset",
    "compare_hierarchy",
    "convert_sctab_store",
    "read_part_metadata",
    "read_sctab_store",
    "write_sctab_store",
]
