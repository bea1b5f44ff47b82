"""Task data from local files, for lm-eval task YAMLs on machines with no internet.

A YAML in this folder names it as `custom_dataset: !function local_files.load` and lists its files per split
under `dataset_kwargs: {data_files: {test: ..., dev: ...}}`. A relative path is looked up first under the folder
in the environment variable LOR2C_TASK_DATA (your own copies of MMLU, BBH, DROP, HumanEval), then under
`data/` next to this file (the tiny test tasks shipped here); an absolute path is used as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any

DATA_ENV = "LOR2C_TASK_DATA"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def resolve(path: str) -> str:
    """The file a YAML's `data_files` entry points to; a clear error when it is in none of the places."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        candidates = [path]
    else:
        roots = ([os.environ[DATA_ENV]] if os.environ.get(DATA_ENV) else []) + [SHIPPED]
        candidates = [os.path.join(root, path) for root in roots]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"Local task data {path!r} not found (looked at {candidates}). Put the file there, set "
                            f"{DATA_ENV} to the folder that holds it, or give an absolute path in the task YAML's "
                            "dataset_kwargs.data_files.")


def read_split(path: str):
    """One split: JSON lines or a JSON list of records (read directly, no cache), or parquet/csv/arrow."""
    import datasets

    file = resolve(path)
    extension = os.path.splitext(file)[1].lower()
    if extension in BUILDERS:
        return datasets.load_dataset(BUILDERS[extension], data_files=file, split="train")
    with open(file, encoding="utf-8") as f:
        if extension == ".jsonl":
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.load(f)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{file} must hold a non-empty list of records (JSON lines, or a JSON list).")
    return datasets.Dataset.from_list(records)


def load(data_files: dict[str, str], **_metadata: Any):
    """A `DatasetDict` with one split per entry of `data_files` (lm-eval passes the task metadata too)."""
    import datasets

    if not isinstance(data_files, dict) or not data_files:
        raise ValueError("dataset_kwargs.data_files must map split names to files, e.g. {test: mmlu/test.jsonl}.")
    return datasets.DatasetDict({split: read_split(path) for split, path in data_files.items()})
