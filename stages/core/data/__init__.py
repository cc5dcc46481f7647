"""Datasets, splits, transforms and loaders (the PyTorch core: no Ray, no MLflow)."""

from exitflow.stages.core.data.check import check_dataset
from exitflow.stages.core.data.loading import Splits, TransformedSubset, dataset_info, load_splits, make_loader, train_collate
from exitflow.stages.core.data.spec import DATASET_NAMES, DataError, DatasetInfo, DataSpec
from exitflow.stages.core.data.split import stratified_split, stratified_subset

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
    "train_collate",
]
