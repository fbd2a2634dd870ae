"""TFDS datasets for the three CLaRa formats, built from JSONL files (local or `gs://`).

    builder = prepare("stage2", "converted/", data_dir="tfds/")
    source = builder.as_data_source(split="train")   # random access, no tensorflow

The source is a directory of `{split}.jsonl` (or `.jsonl.gz`) files or a {split: path}
mapping; every row is validated by
`clara_jax.data.formats` (strict: the first bad row stops preparation with file, line and
field; `on_error="skip"` skips and counts). Data is written as array_record, which TFDS
reads back without tensorflow.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import tensorflow_datasets as tfds

from clara_jax import paths
from clara_jax.data import fingerprint, formats

_TEXT = tfds.features.Text
_TEXTS = lambda: tfds.features.Sequence(tfds.features.Text())

FEATURES = {
  formats.STAGE1: lambda: tfds.features.FeaturesDict(
    {"data_type": _TEXT(), "question": _TEXTS(), "answers": _TEXTS(), "docs": _TEXTS()}
  ),
  formats.STAGE1_2: lambda: tfds.features.FeaturesDict(
    {"question": _TEXT(), "docs": _TEXTS(), "answer": _TEXT(), "answers": _TEXTS()}
  ),
  formats.STAGE2: lambda: tfds.features.FeaturesDict(
    {
      "question": _TEXT(),
      "docs": _TEXTS(),
      "answer": _TEXT(),
      "answers": _TEXTS(),
      "pos_index": tfds.features.Sequence(np.int32),
    }
  ),
}


def split_files(source_dir: paths.PathLike) -> Dict[str, str]:
  """{split: path} for every `{split}.jsonl[.gz]` in `source_dir`."""
  files: Dict[str, str] = {}
  directory = paths.path(source_dir)
  names = sorted(p.name for pattern in ("*.jsonl", "*.jsonl.gz") for p in directory.glob(pattern))
  for name in names:
    split = name.split(".jsonl")[0]
    if split in files:
      raise ValueError(f"{source_dir}: split {split!r} has both .jsonl and .jsonl.gz files")
    files[split] = paths.join(source_dir, name, absolute=False)
  if not files:
    raise FileNotFoundError(f"{source_dir}: no {{split}}.jsonl files found")
  return files


class _ClaraBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared builder logic; subclasses name the format."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "CLaRa JSONL formats, validated and normalised."}
  FORMAT = ""

  def __init__(
    self,
    *,
    files: Dict[str, str],
    on_error: str = "raise",
    num_docs: Optional[int] = None,
    **kwargs: Any,
  ) -> None:
    self._files, self._on_error, self._num_docs = dict(files), on_error, num_docs
    self.reports: Dict[str, formats.ReadReport] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=FEATURES[self.FORMAT](),
      description=f"CLaRa {self.FORMAT} rows from local JSONL.",
    )

  def _split_generators(self, dl_manager: Any) -> Dict[str, Iterator[Tuple[int, dict]]]:
    del dl_manager  # local files only: nothing is downloaded
    return {split: self._generate_examples(split, path) for split, path in self._files.items()}

  # TFDS prints these two lines to stdout on every preparation; they are logged instead
  # (INFO), since preparing local files is a routine step of every stage.
  def _log_download_bytes(self) -> None:
    logging.info("preparing %s from %s in %s", self.name, self._files, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("prepared %s in %s", self.name, self.data_dir)

  def _generate_examples(self, split: str, path: str) -> Iterator[Tuple[int, dict]]:
    report = self.reports.setdefault(split, formats.ReadReport())
    for i, row in enumerate(
      formats.read_rows(path, self.FORMAT, self._on_error, self._num_docs, report)
    ):
      yield i, row
    if report.rows_skipped:
      logging.warning("%s: %s", path, report.summary())


class ClaraStage1(_ClaraBuilder):
  FORMAT = formats.STAGE1


class ClaraStage12(_ClaraBuilder):
  FORMAT = formats.STAGE1_2


class ClaraStage2(_ClaraBuilder):
  FORMAT = formats.STAGE2


BUILDERS = {
  formats.STAGE1: ClaraStage1,
  formats.STAGE1_2: ClaraStage12,
  formats.STAGE2: ClaraStage2,
}


def prepare(
  fmt: str,
  source: Union[str, os.PathLike, Dict[str, str]],
  data_dir: str,
  on_error: str = "raise",
  num_docs: Optional[int] = None,
) -> _ClaraBuilder:
  """Validates and writes the dataset (once; later calls reuse it) and returns the
  builder, whose `as_data_source(split)` gives random access to decoded rows.

  Args:
    source: a directory of `{split}.jsonl[.gz]` files, or a {split: path} dict.
  """
  if fmt not in BUILDERS:
    raise ValueError(f"unknown format {fmt!r}; known: {sorted(BUILDERS)}")
  files = split_files(source) if isinstance(source, (str, os.PathLike)) else dict(source)
  for split, path in files.items():
    if not paths.exists(path):
      raise FileNotFoundError(f"{path}: no such file (split {split!r})")
  builder = BUILDERS[fmt](
    files=files, on_error=on_error, num_docs=num_docs, data_dir=data_dir, file_format="array_record"
  )
  # TFDS reuses a prepared dataset by name and version alone: record what it was
  # prepared from, and refuse to reuse it for other files or settings.
  inputs = {
    "format": fmt,
    "on_error": on_error,
    "num_docs": num_docs,
    "files": {split: fingerprint.file_fingerprint(path) for split, path in sorted(files.items())},
  }
  record = paths.join(data_dir, builder.name + fingerprint.FINGERPRINT_SUFFIX, absolute=False)
  if paths.exists(record):
    fingerprint.check_or_record(record, inputs, f"the prepared dataset in {data_dir}")
  builder.download_and_prepare()
  fingerprint.check_or_record(record, inputs, f"the prepared dataset in {data_dir}")
  return builder


def decode_row(row: Dict) -> Dict:
  """TFDS yields bytes for text; turn an example back into a normalised row."""

  def text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value

  out = {}
  for key, value in row.items():
    if isinstance(value, (list, tuple, np.ndarray)) and key != "pos_index":
      out[key] = [text(v) for v in value]
    elif key == "pos_index":
      out[key] = [int(v) for v in value]
    else:
      out[key] = text(value)
  return out
