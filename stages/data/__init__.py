"""Datasets, splits, transforms and loaders (the PyTorch core: no Ray, no MLflow)."""

from stages.data.check import check_dataset
from stages.data.loading import Splits, TransformedSubset, dataset_info, load_splits, make_loader
from stages.data.spec import DATASET_NAMES, DataError, DatasetInfo, DataSpec
from stages.data.split import stratified_split, stratified_subset

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "DataSpec",
    "DatasetInfo",
    "Splits",
    "TransformedSubset",
    "check_dataset",
    "dataset_info",
    "load_splits",
    "make_loader",
    "stratified_split",
    "stratified_subset",
]
