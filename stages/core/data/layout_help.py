"""The layouts `exitflow data` reads, drawn as small trees: what a folder it does not know is answered with."""

from __future__ import annotations

from pathlib import Path

from exitflow.stages.core.data.prepare_files import IMAGE_SUFFIXES

ACCEPTED_LAYOUTS = f"""\
the layouts exitflow data reads (detected; --format names one):
  imagefolder, flat: one folder per class, split here into train and test
      (--test-fraction, default 0.2, stratified per class, --seed, recorded in OUT/dataset.json)
    SOURCE/
      cat/  1.jpg  2.png ...
      dog/  ...
  imagefolder, split already: train/ -> train.parquet, val/ -> test.parquet
      (or test/; --test-folder NAME picks; train/ alone is split as a flat folder is)
    SOURCE/
      train/  cat/ dog/ ...
      val/    cat/ dog/ ...
  cifar10 / cifar100: torchvision's download folder
    SOURCE/cifar-10-batches-py/   data_batch_1 ... data_batch_5  test_batch  batches.meta
    SOURCE/cifar-100-python/      train  test  meta
  svhn
    SOURCE/  train_32x32.mat  test_32x32.mat
  tinyimagenet
    SOURCE/  wnids.txt  [words.txt]
      train/<wnid>/images/*
      val/images/*  val/val_annotations.txt
  imagenet
    SOURCE/  [LOC_synset_mapping.txt]
      train/<wnid>/*
      val/<wnid>/*   or a flat val/* with LOC_val_solution.csv beside it
image files: {' '.join(IMAGE_SUFFIXES)} (other files are skipped, and the output says which)"""

_SHOWN = 6  # entries of an unknown folder named in the message


def unknown_layout(source: Path, why: str = "not a layout exitflow knows") -> str:
    """`source: why (what it holds)` and the accepted layouts."""
    return f"{source}: {why} ({_holds(source)})\n{ACCEPTED_LAYOUTS}"


def _holds(source: Path) -> str:
    try:
        entries = sorted(source.iterdir())
    except OSError as err:
        return f"cannot list it: {err}"
    if not entries:
        return "it is empty"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"it holds {', '.join(names[:_SHOWN])}{more}"
