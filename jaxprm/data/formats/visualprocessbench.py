"""VisualProcessBench importer (Wang et al., "VisualPRM", arXiv 2503.10291; dataset
``OpenGVLab/VisualProcessBench``, split ``test`` = ``test.jsonl``).

Fields, from the dataset card: ``image`` (list of image paths), ``question``, ``answer``,
``response`` = ``{"steps": [...], "process_correctness": [...]}`` with human labels ``1`` correct,
``0`` neutral, ``-1`` incorrect, ``policy_model``, ``data_source``. The card's ``dataset_info`` types
``response`` as a string, so a JSON-encoded ``response`` is accepted too. Rows have no id field;
ids are ``"<file name>:<line>"`` unless a row has an ``id``.

``read_visualprocessbench`` gives ``Record``s; ``read_visualprocessbench_rows`` gives the rows as
published (``response`` decoded), with the same checks of ``response``, for scoring a PRM on the
benchmark (``jaxprm.eval.step_f1.load_visualprocessbench``).

Labels: 1 -> 1, -1 -> 0, 0 (neutral) -> by ``neutral``: ``"ignore"`` (default) -> None, i.e. not
scored, ``"positive"`` -> 1, ``"negative"`` -> 0. The raw annotation is kept in
``meta["process_correctness"]``. Every step is ``"reasoning"`` (the benchmark does not mark
perception steps); ``<image>`` placeholders are removed from the question.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

from jaxprm.data import labels as _labels
from jaxprm.data.formats._common import (
    ImportStats,
    RowError,
    fail,
    iter_rows,
    located,
    optional_str,
    question_record,
    require_object,
    resolve_label_rule,
    row_id as _row_id,
    run_import,
)
from jaxprm.data.schema import NEGATIVE, POSITIVE, REASONING, Record, RecordError, Step

SOURCE = "visualprocessbench"


def _response(row: dict, rid: str) -> dict:
    """The row's ``response`` (decoded when stored as a JSON string), checked: a non-empty list of
    step strings and as many labels 1 / 0 / -1."""
    resp = row.get("response")
    if isinstance(resp, str):
        try:
            resp = json.loads(resp)
        except json.JSONDecodeError as e:
            raise fail(rid, "response", f"not a JSON object: {e}") from None
    if not isinstance(resp, dict):
        raise fail(rid, "response", f"must be an object with 'steps' and 'process_correctness', got {type(resp).__name__}")
    texts, pc = resp.get("steps"), resp.get("process_correctness")
    if not isinstance(texts, list) or not texts:
        raise fail(rid, "response.steps", f"must be a non-empty list of strings, got {texts!r}")
    if not isinstance(pc, list):
        raise fail(rid, "response.process_correctness", f"must be a list of 1/0/-1, got {pc!r}")
    if len(pc) != len(texts):
        raise fail(rid, "response.process_correctness", f"has {len(pc)} labels for {len(texts)} steps")
    for i, (t, c) in enumerate(zip(texts, pc)):
        if not isinstance(t, str) or not t.strip():
            raise fail(rid, f"response.steps[{i}]", f"must be a non-empty string, got {t!r}")
        if isinstance(c, bool) or c not in (1, 0, -1):
            raise fail(rid, f"response.process_correctness[{i}]", f"must be 1, 0 or -1, got {c!r}")
    return resp


def _to_record(row: Any, where: str, *, neutral_label, neutral, label_fn) -> Record:
    require_object(row)
    rid = _row_id(row, where, keys=("id",))
    resp = _response(row, rid)
    pc = resp["process_correctness"]
    labels = [POSITIVE if c == 1 else NEGATIVE if c == -1 else neutral_label for c in pc]
    steps = [Step(text=t.strip(), kind=REASONING, label=lab) for t, lab in zip(resp["steps"], labels)]
    meta: dict[str, Any] = {"process_correctness": [int(c) for c in pc],
                            "label_rule": {"name": "human", "neutral": neutral}}
    for k in ("policy_model", "data_source"):
        v = optional_str(row.get(k))
        if v is not None:
            meta[k] = v
    rec = question_record(row, rid, steps, source=SOURCE, meta=meta)
    return label_fn(rec) if label_fn else rec


def read_visualprocessbench(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    label_rule: str | Callable | None = None,
    label_kw: dict | None = None,
    *,
    neutral: str = "ignore",
    on_error: str = "raise",
    stats: ImportStats | None = None,
    check_images: bool | None = None,
    allow_outside_root: bool = False,
) -> Iterator[Record]:
    """Read VisualProcessBench JSONL (or Parquet) rows with their human step labels.

    ``neutral`` maps the neutral annotation (0); ``label_rule`` (default None: the human labels)
    would replace them. Other arguments as for ``read_vlprm300k``."""
    neutral_label = _labels._neutral_label(neutral)
    label_fn = resolve_label_rule(label_rule, label_kw)

    def convert(row, where):
        return _to_record(row, where, neutral_label=neutral_label, neutral=neutral, label_fn=label_fn)

    return run_import(path, convert, on_error=on_error, stats=stats, image_root=image_root,
                      check_images=check_images, allow_outside_root=allow_outside_root)


def read_visualprocessbench_rows(path: str | os.PathLike) -> list[dict]:
    """VisualProcessBench rows as published (a JSON-string ``response`` decoded in place), each
    checked as ``read_visualprocessbench`` checks ``response``. The first bad row raises
    ``RecordError`` naming ``file:line``, the record and the field. Blank lines are skipped."""
    rows = []
    for where, row in iter_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            require_object(row)
            row["response"] = _response(row, _row_id(row, where, keys=("id",)))
        except RecordError as e:
            raise RecordError(located(where, e)) from None
        rows.append(row)
    return rows


__all__ = ["read_visualprocessbench", "read_visualprocessbench_rows"]
