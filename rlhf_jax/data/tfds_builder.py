"""JSONL records as a TFDS dataset in array_record files, read back with random access.

    prepare_jsonl_dataset("prefs.jsonl", "preference", data_dir)   # -> <data_dir>/prefs/1.0.0
    records = load_split("prefs", "train", data_dir)                # len(), records[i] -> dict

Writing and reading both work without TensorFlow (TFDS's array_record path needs only
`array_record`), and nothing is downloaded. Records keep their file order: the builder
disables TFDS's shuffling, so `records[i]` is the i-th record of the JSONL file. Each split
is validated in full (rlhf_jax.data.sources) before anything is written.

A prepared dataset is an ordinary TFDS folder, so `tfds.data_source(name, split=...,
data_dir=...)` reads it too, in any process, without this module's builder class.
"""

from __future__ import annotations

import collections.abc
import hashlib
import os
import re
import tempfile
from typing import Any, Mapping

import tensorflow_datasets as tfds

from rlhf_jax.data import sources

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One dataset per instance: `name`, a schema, and a JSONL file per split.

  Not registered with TFDS (its name is chosen per instance), so reading goes through the
  dataset's folder, which carries its own features and split metadata.
  """

  VERSION = tfds.core.Version("1.0.0")
  # No code folder to look for checksums or docs in. TFDS 4.9.10's lookup also imports the
  # `importlib_resources` backport, which it does not install on Python >= 3.9.
  code_path = None

  def __init__(self, *, name: str, schema: str, split_files: Mapping[str, str],
               data_dir: str, version: str = "1.0.0"):
    if not _NAME_RE.match(name):
      raise ValueError(f"dataset name {name!r} is not a TFDS name: use lower-case letters, "
                       "digits and underscores, starting with a letter (e.g. 'my_prefs').")
    if not split_files:
      raise ValueError(f"dataset {name!r}: no splits given; pass {{'train': 'file.jsonl'}}.")
    self.name = name
    self.VERSION = tfds.core.Version(version)  # pylint: disable=invalid-name
    self._schema = schema
    self._fields = sources.schema_fields(schema)
    self._split_files = dict(split_files)
    for split, path in self._split_files.items():
      if os.path.isdir(path):
        raise ValueError(f"dataset {name!r}, split {split!r}: {path} is a directory; give a "
                         "JSONL file.")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {name!r}, split {split!r}: JSONL file {path} does "
                                "not exist.")
    # Stored with the dataset so a later prepare can tell whether the files changed.
    self.fingerprint = {
        "schema": schema,
        "splits": {split: {"file": os.path.abspath(path), "sha256": _sha256(path)}
                   for split, path in sorted(self._split_files.items())},
    }
    super().__init__(data_dir=data_dir, version=version, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"rlhf_jax {self._schema!r} records from JSONL files.",
        features=tfds.features.FeaturesDict(
            {field: tfds.features.Text() for field in self._fields}),
        disable_shuffling=True,  # Keep file order; keys are line-order indices.
        metadata=tfds.core.MetadataDict(self.fingerprint),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    # Read and check every split before TFDS writes any of them.
    records = {split: sources.read_jsonl(path, self._schema)
               for split, path in self._split_files.items()}
    return {split: self._generate_examples(recs) for split, recs in records.items()}

  def _generate_examples(self, records):
    yield from enumerate(records)


def _same_source(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Same schema and file contents per split; where the files live does not matter."""
  digests = lambda m: {s: v.get("sha256") for s, v in dict(m.get("splits", {})).items()}
  return a.get("schema") == b.get("schema") and digests(a) == digests(b)


def _default_name(path: str) -> str:
  stem = os.path.basename(path).split(".")[0].lower()
  name = re.sub(r"[^a-z0-9_]", "_", stem)
  return name if name[:1].isalpha() else "jsonl_" + name


def prepare_jsonl_dataset(jsonl_path: str | Mapping[str, str], schema: str, data_dir: str,
                          name: str | None = None, split: str = "train", *,
                          version: str = "1.0.0", overwrite: bool = False) -> str:
  """Builds `<data_dir>/<name>/<version>` from JSONL; returns that folder.

  `jsonl_path` is one file (stored as `split`) or a {split: file} mapping; all splits of
  a dataset are built together. `name` defaults to the file name without extensions
  ("my-prefs.jsonl" -> "my_prefs"). Preparing the same files again reuses the dataset;
  different contents under an existing name and version are an error unless `overwrite`.
  """
  split_files = {split: jsonl_path} if isinstance(jsonl_path, str) else dict(jsonl_path)
  if name is None:
    name = _default_name(next(iter(split_files.values()), ""))
  builder = JsonlBuilder(name=name, schema=schema, split_files=split_files,
                         data_dir=data_dir, version=version)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if builder.is_prepared():
    existing = tfds.builder_from_directory(builder.data_dir).info.metadata or {}
    if _same_source(existing, builder.fingerprint):
      return os.fspath(builder.data_dir)
    if not overwrite:
      raise ValueError(
          f"{builder.data_dir} already holds dataset {name!r} {version}, built from other "
          f"data ({dict(existing)}); pass overwrite=True to rebuild it, or choose another "
          "name or version.")
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  config = tfds.download.DownloadConfig(download_mode=mode, try_download_gcs=False)
  # TFDS makes an (unused) downloads/ folder; keep it out of data_dir.
  with tempfile.TemporaryDirectory() as download_dir:
    # The file format comes from the constructor; passing it again here fails when the
    # builder has loaded an existing dataset's info (the overwrite case).
    builder.download_and_prepare(download_dir=download_dir, download_config=config)
  return os.fspath(builder.data_dir)


class TextRecords(collections.abc.Sequence):
  """Random access to one split: `records[i]` is a dict of python str (bytes decoded)."""

  def __init__(self, source, where: str):
    self._source, self.where = source, where
    self.fields = tuple(source.dataset_info.features.keys())

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(range(*index.indices(len(self))))
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"{self.where}: index {index} out of range for {n} records.")
    return _to_python(self._source[index % n])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    """A batch of records in one read, as data loaders (grain, PyTorch) ask for them."""
    return [_to_python(r) for r in self._source.__getitems__(list(indices))]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"TextRecords({self.where}, {len(self)} records, fields={list(self.fields)})"


def _to_python(record: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


def load_split(name_or_dir: str, split: str = "train", data_dir: str | None = None
               ) -> TextRecords:
  """One split of a prepared dataset, by folder (`<data_dir>/<name>/<version>`) or by name.

  A name may carry a version ("my_prefs:1.0.0"); without one the newest is used. Without
  `data_dir`, TFDS's default data folder is searched. `split` accepts TFDS slices
  ("train[:100]").
  """
  is_dir = os.path.isfile(os.path.join(name_or_dir, "dataset_info.json"))
  where = name_or_dir if is_dir else f"{name_or_dir} in {data_dir or 'default TFDS data_dir'}"
  base = name_or_dir.split(":")[0]
  if not is_dir and data_dir is not None and not os.path.isdir(os.path.join(data_dir, base)):
    found = sorted(d for d in os.listdir(data_dir)
                   if os.path.isdir(os.path.join(data_dir, d))) if os.path.isdir(data_dir) else []
    raise FileNotFoundError(
        f"no dataset {base!r} under data_dir {data_dir} (it has: {found}); build it with "
        "prepare_jsonl_dataset(...) or pass the dataset's folder.")
  try:
    if is_dir:
      source = tfds.builder_from_directory(name_or_dir).as_data_source(split=split)
    else:
      source = tfds.data_source(name_or_dir, split=split, data_dir=data_dir, download=False,
                                try_gcs=False)
  except tfds.core.DatasetNotFoundError:
    # TFDS's own message lists its whole catalog; this one says where we looked.
    raise FileNotFoundError(
        f"dataset {where} is not prepared; build it with prepare_jsonl_dataset(...) or pass "
        "data_dir.") from None
  except ValueError as e:  # Unknown split, bad slice.
    raise ValueError(f"dataset {where}: {e}") from e
  return TextRecords(source, f"{where} [{split}]")


def main(argv=None):
  """`python -m rlhf_jax.data.tfds_builder --schema sft --data_dir D train=a.jsonl eval=b.jsonl`"""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Build a TFDS (array_record) dataset from JSONL.")
  parser.add_argument("--schema", required=True, choices=sorted(sources.SCHEMAS))
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--name", default=None, help="default: the first file's name")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("splits", nargs="+", help="SPLIT=FILE.jsonl, e.g. train=a.jsonl eval=b.jsonl")
  args = parser.parse_args(argv)
  split_files = {}
  for item in args.splits:
    split, sep, path = item.partition("=")
    if not sep or not split or not path:
      parser.error(f"{item!r}: expected SPLIT=FILE.jsonl")
    split_files[split] = path
  print(prepare_jsonl_dataset(split_files, args.schema, args.data_dir, args.name,
                              overwrite=args.overwrite))


if __name__ == "__main__":
  main()
