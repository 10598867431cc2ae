"""Importers from public VL-PRM data formats to ``jaxprm.data.schema.Record``, and our own JSONL.

    from jaxprm.data.formats import read_records, write_jsonl, ImportStats
    stats = ImportStats()
    recs = read_records("VL_PRM300K_V2.parquet", format="vlprm300k", image_root="data/",
                        label_rule="hybrid", on_error="skip", stats=stats)
    write_jsonl(recs, "vlprm300k.jsonl")          # atomically; stats.skipped rows were dropped

Formats (``FORMATS``; case, ``-`` and ``_`` are ignored when looking a name up):

=====================  ==========================================================================
``jsonl``              our own ``Record.to_dict()`` lines (``read_jsonl`` / ``write_jsonl``)
``vlprm300k``          VL-PRM300K raw parquet (``steps_with_score``, ``first_incorrect_step``)
``vlprm300k_train``    VL-PRM300K-V1-train (``image`` + chat ``messages`` with ``+``/``-`` turns)
``visualprm400k``      VisualPRM400K conversations and/or raw MC-score rows
``visualprocessbench`` VisualProcessBench JSONL (``process_correctness`` 1/0/-1)
=====================  ==========================================================================

Every reader takes a file or a directory of ``.jsonl``/``.json``/``.parquet`` files and returns a
lazy iterator of validated records. Bad rows raise ``RecordError`` whose message starts with the
file and row (``data.jsonl:17: record 'abc': field 'steps[2].kind': ...``); with
``on_error="skip"`` they are logged and counted in the ``ImportStats`` passed as ``stats=``.

Benchmark question files (MMMU, MathVista, MathVision, PuzzleVQA, ...) are questions with gold
answers, not records with steps: ``load_benchmark_jsonl`` (``benchmarks``) reads them into dicts.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Iterator

from jaxprm.atomic import atomic_open
from jaxprm.data.formats._common import ImportStats, RowError, resolve_label_rule, run_import
from jaxprm.data.formats.benchmarks import BenchmarkFormatError, load_benchmark_jsonl
from jaxprm.data.formats.visualprm400k import read_visualprm400k
from jaxprm.data.formats.visualprocessbench import read_visualprocessbench, read_visualprocessbench_rows
from jaxprm.data.formats.vlprm300k import read_vlprm300k, read_vlprm300k_train
from jaxprm.data.schema import Record, RecordError


def read_jsonl(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    label_rule: str | Callable | None = None,
    label_kw: dict | None = None,
    *,
    on_error: str = "raise",
    stats: ImportStats | None = None,
    check_images: bool | None = None,
    allow_outside_root: bool = False,
) -> Iterator[Record]:
    """Read records written by ``write_jsonl`` (one ``Record.to_dict()`` per line). Labels are kept
    unless ``label_rule`` is given; relative image paths are joined onto ``image_root`` if given."""
    label_fn = resolve_label_rule(label_rule, label_kw)

    def convert(row: Any, where: str) -> Record:
        rec = Record.from_dict(row, where=where)
        return label_fn(rec) if label_fn else rec

    return run_import(path, convert, on_error=on_error, stats=stats, image_root=image_root,
                      check_images=check_images, allow_outside_root=allow_outside_root)


def write_jsonl(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Validate and write records as JSON Lines, atomically (``jaxprm.atomic``): on any error the
    target is left untouched. Returns the number of records written."""
    path = os.fspath(path)
    n = 0
    with atomic_open(path, "w") as f:
        for n, rec in enumerate(records, 1):
            if not isinstance(rec, Record):
                raise RecordError(f"{path}: item {n - 1}: expected a Record, got {type(rec).__name__}")
            try:
                rec.validate()
            except RecordError as e:
                raise RecordError(f"{path}: item {n - 1}: {e}") from None
            f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
    return n


FORMATS: dict[str, Callable[..., Iterator[Record]]] = {
    "jsonl": read_jsonl,
    "vlprm300k": read_vlprm300k,
    "vlprm300k_train": read_vlprm300k_train,
    "visualprm400k": read_visualprm400k,
    "visualprocessbench": read_visualprocessbench,
}


def _format_key(name: str) -> str:
    return "".join(c for c in str(name).lower() if c not in "-_ ")


def get_reader(format: str) -> Callable[..., Iterator[Record]]:
    """The reader registered for ``format`` (case, ``-``, ``_`` and spaces ignored: "VL-PRM300K")."""
    by_key = {_format_key(k): v for k, v in FORMATS.items()}
    key = _format_key(format)
    if key not in by_key:
        raise ValueError(f"unknown record format {format!r}; known formats: {sorted(FORMATS)}")
    return by_key[key]


def read_records(path: str | os.PathLike, format: str = "jsonl", **kwargs: Any) -> Iterator[Record]:
    """Read ``path`` with the reader registered for ``format``; ``kwargs`` go to that reader
    (``image_root``, ``allow_outside_root``, ``label_rule``, ``label_kw``, ``on_error``, ``stats``, ...).
    An image path that resolves outside ``image_root`` is a bad row unless ``allow_outside_root``."""
    return get_reader(format)(path, **kwargs)


__all__ = [
    "BenchmarkFormatError",
    "FORMATS",
    "ImportStats",
    "RecordError",
    "RowError",
    "get_reader",
    "read_records",
    "read_jsonl",
    "write_jsonl",
    "read_vlprm300k",
    "read_vlprm300k_train",
    "read_visualprm400k",
    "read_visualprocessbench",
    "read_visualprocessbench_rows",
    "load_benchmark_jsonl",
]
