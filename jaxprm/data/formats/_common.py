"""Plumbing shared by the importers: row readers that know their file and row, error prefixes,
the skip/raise policy with its counters, image-path resolution, and chat-turn parsing.

Row positions in messages: JSON Lines use the 1-based line number (``data.jsonl:17``); Parquet and
JSON-array files use the 0-based row index (``train.parquet:row 5``), which is what
``pyarrow.Table.slice`` / ``datasets.Dataset.__getitem__`` take.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from jaxprm.data import labels as _labels
from jaxprm.data.schema import Record, RecordError
from jaxprm.data.jsonl import BadLine, iter_jsonl

log = logging.getLogger("jaxprm.data.formats")

ON_ERROR_CHOICES = ("raise", "skip")
_DIR_SUFFIXES = (".jsonl", ".parquet")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclasses.dataclass
class ImportStats:
    """Counters an importer fills in as it is iterated (pass one in with ``stats=``).

    ``rows``: rows read; ``records``: records yielded; ``skipped``: rows dropped under
    ``on_error="skip"``; ``errors``: the first ``max_errors`` skip messages (``file:row: ...``).
    """

    rows: int = 0
    records: int = 0
    skipped: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    max_errors: int = 1000

    def _skip(self, msg: str) -> None:
        self.skipped += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(msg)


class RowError(RecordError):
    """A row could not even be parsed (e.g. invalid JSON); carries the ``file:row`` prefix."""


# -- row readers -----------------------------------------------------------------------------------
def _files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    if p.is_dir():  # .json is left out here: dataset dirs keep metadata in e.g. meta.json
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _DIR_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{p}: no {'/'.join(_DIR_SUFFIXES)} files in directory")
        return files
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    return [p]


def _iter_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    for where, row in iter_jsonl(p):
        yield where, RowError(row.message) if isinstance(row, BadLine) else row


def _iter_json(p: Path) -> Iterator[tuple[str, Any]]:
    with open(p, "rb") as f:
        data = f.read()
    if not data.lstrip().startswith(b"["):  # JSON Lines stored with a .json name (decoded line by line)
        yield from _iter_jsonl(p)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # one bad record (the array cannot be read), counted in skip mode
        where = f"{p}:{data[:e.start].count(10) + 1}"  # 10 = b"\n"
        yield where, RowError(f"{where}: not UTF-8: byte {data[e.start:e.start + 1]!r}")
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError(f"{p}: invalid JSON: {e}") from None
    for i, row in enumerate(rows):
        yield f"{p}:row {i}", row


def _iter_parquet(p: Path, batch_size: int = 256) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield f"{p}:row {i}", row
            i += 1


def iter_rows(path: str | os.PathLike | list[Path]) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every row of a .jsonl/.json/.parquet file, or of every .jsonl/.parquet
    file in a directory (sorted by name). ``row`` is a ``RowError`` for an unparseable line."""
    for p in path if isinstance(path, list) else _files(path):
        if p.suffix == ".parquet":
            yield from _iter_parquet(p)
        elif p.suffix == ".json":
            yield from _iter_json(p)
        else:
            yield from _iter_jsonl(p)


def row_name(where: str) -> str:
    """``/a/b/test.jsonl:17`` -> ``test.jsonl:17``; ``/a/t.parquet:row 5`` -> ``t.parquet:5`` (for ids)."""
    file, _, pos = where.rpartition(":")
    return f"{os.path.basename(file)}:{pos.replace('row ', '')}"


def row_id(row: dict, where: str, keys: tuple[str, ...] = ("id", "uid", "rollout_uuid")) -> str:
    """The row's own id (first usable of ``keys``; InternVL's placeholder ``-1`` is not usable),
    else ``"<file name>:<row>"``."""
    for k in keys:
        v = row.get(k)
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, str)) and str(v).strip() and str(v) != "-1":
            return str(v)
    return row_name(where)


def require_object(row: Any) -> None:
    """A row must be a JSON object (before it has an id to name)."""
    if not isinstance(row, dict):
        raise RecordError(f"record '<no id>': a row must be an object, got {type(row).__name__}")


# -- the import loop -------------------------------------------------------------------------------
def fail(rid: Any, field: str, msg: str) -> RecordError:
    rid = rid if isinstance(rid, str) and rid else "<no id>"
    return RecordError(f"record {rid!r}: field {field!r}: {msg}")


def resolve_label_rule(label_rule: Any, label_kw: dict | None) -> Callable[[Record], Record] | None:
    if label_rule is None:
        if label_kw:
            raise ValueError("label_kw given without a label_rule")
        return None
    rule = _labels.get_label_rule(label_rule)
    kw = dict(label_kw or {})
    return lambda rec: rule(rec, **kw)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


def run_import(
    path: str | os.PathLike,
    convert: Callable[[Any, str], Record],
    *,
    on_error: str = "raise",
    stats: ImportStats | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool | None = None,
    allow_outside_root: bool = False,
) -> Iterator[Record]:
    """Drive ``convert(row, where) -> Record`` over the rows of ``path``: resolve image paths, check
    they exist, validate, and apply ``on_error``. Every error message starts with ``file:row``.
    Arguments and the path are checked now; rows are read lazily as the iterator is consumed."""
    check_on_error(on_error)
    files = _files(path)
    stats = stats if stats is not None else ImportStats()
    if check_images is None:
        check_images = image_root is not None
    return _run(files, convert, on_error, stats, image_root, bool(check_images), allow_outside_root)


def _run(files, convert, on_error, stats, image_root, check_images, allow_outside_root=False) -> Iterator[Record]:
    for where, row in iter_rows(files):
        stats.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            rec = convert(row, where)
            rec.images = [resolve_image(im, image_root, allow_outside_root) for im in rec.images]
            if check_images:
                check_image_files(rec)
            rec.validate()
        except RecordError as e:
            _handle(located(where, e), on_error, stats)
            continue
        except ImagePathError as e:
            _handle(f"{where}: {e}", on_error, stats)
            continue
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # malformed row
            msg = f"{where}: malformed row: {type(e).__name__}: {e}"
            _handle(msg, on_error, stats)
            continue
        stats.records += 1
        yield rec


def located(where: str, e: Exception) -> str:
    """The message of ``e``, starting with ``where`` (``file:row``) once."""
    return str(e) if str(e).startswith(where) else f"{where}: {e}"


def _handle(msg: str, on_error: str, stats: ImportStats) -> None:
    if on_error == "raise":
        raise RecordError(msg) from None
    stats._skip(msg)
    log.warning("skipping %s", msg)


# -- images --------------------------------------------------------------------------------------------
class ImagePathError(ValueError):
    """An image path that resolves outside ``image_root``."""


def resolve_image(im: Any, image_root: str | os.PathLike | None, allow_outside_root: bool = False) -> Any:
    """Join a relative path onto ``image_root``; bytes and URLs pass through, as does every path
    when ``image_root`` is None. With a root, the result is absolute, the path is resolved (``..``
    and symlinks) and one outside the root (``../x.png``, ``/etc/x.png``) raises ``ImagePathError`` naming it, unless
    ``allow_outside_root``."""
    if not isinstance(im, str) or image_root is None or _URL_RE.match(im):
        return im
    root = os.fspath(image_root)
    path = os.path.abspath(os.path.join(root, im))  # absolute: resolving the result again is a no-op
    if allow_outside_root:
        return path
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImagePathError(f"image path {im!r} resolves to {real!r}, outside image_root {real_root!r} "
                             f"(allow_outside_root=True permits it)")
    return path


def check_image_files(rec: Record) -> None:
    for i, im in enumerate(rec.images):
        if isinstance(im, str) and not _URL_RE.match(im) and not os.path.isfile(im):
            raise fail(rec.id, f"images[{i}]", f"image file not found: {im}")


def images_from(value: Any, rid: str, field: str) -> list[bytes | str]:
    """Normalise an image field: a path, a list of paths, or an HF ``Image`` struct
    ``{"bytes": ..., "path": ...}`` (embedded bytes are kept as bytes, not decoded)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[bytes | str] = []
    for i, im in enumerate(items):
        f = f"{field}[{i}]" if isinstance(value, (list, tuple)) else field
        if isinstance(im, dict):
            if im.get("bytes"):
                out.append(bytes(im["bytes"]))
            elif im.get("path"):
                out.append(str(im["path"]))
            else:
                raise fail(rid, f, "image struct has neither 'bytes' nor 'path'")
        elif isinstance(im, (bytes, bytearray)):
            out.append(bytes(im))
        elif isinstance(im, str) and im:
            out.append(im)
        else:
            raise fail(rid, f, f"expected an image path or {{'bytes', 'path'}} struct, got {im!r}")
    return out


# -- small value helpers -----------------------------------------------------------------------------
def require_str(row: dict, key: str, rid: str, field: str | None = None) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise fail(rid, field or key, f"must be a non-empty string, got {v!r}")
    return v


def optional_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    return v if isinstance(v, str) else str(v)


def question_record(row: dict, rid: str, steps: list, *, source: str, meta: dict) -> Record:
    """A ``Record`` of ``steps`` from a row's ``question`` (required; ``<image>`` placeholders removed),
    ``image`` and ``answer`` (optional) columns, as VisualPRM's datasets store them."""
    return Record(
        id=rid,
        question=strip_image_tokens(require_str(row, "question", rid)),
        steps=steps,
        images=images_from(row.get("image"), rid, "image"),
        answer=optional_str(row.get("answer")),
        source=source,
        meta=meta,
    )


def as_count(v: Any, rid: str, field: str) -> int | None:
    """An integer count (integral floats from pandas-written files accepted); None stays None."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise fail(rid, field, f"must be a non-negative integer, got {v!r}")
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if not v.is_integer():
            raise fail(rid, field, f"must be a non-negative integer, got {v!r}")
        v = int(v)
    if not isinstance(v, int) or v < 0:
        raise fail(rid, field, f"must be a non-negative integer, got {v!r}")
    return v


def mc_counts(entry: dict, mc_total: int | None, rid: str, field: str) -> tuple[int | None, int | None]:
    """``(num_mc_correct, num_mc_total)`` of a ``steps_with_score`` entry.

    Uses the stored counts when present (checking ``score`` against them); otherwise derives them
    from the fraction ``score`` as ``round(score * mc_total)``, refusing a score that is not a
    multiple of ``1 / mc_total`` (rounding would move steps across the threshold silently)."""
    correct = as_count(entry.get("num_mc_correct"), rid, f"{field}.num_mc_correct")
    total = as_count(entry.get("num_mc_total"), rid, f"{field}.num_mc_total")
    score = entry.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score)):
        raise fail(rid, f"{field}.score", f"must be a number, got {score!r}")
    if (correct is None) != (total is None):
        raise fail(rid, f"{field}.num_mc_correct", "num_mc_correct and num_mc_total must be given together")
    if correct is not None:
        if correct > total:
            raise fail(rid, f"{field}.num_mc_correct", f"{correct} > num_mc_total {total}")
        if score is not None and total > 0 and abs(score - correct / total) > 1e-6:
            raise fail(rid, f"{field}.score", f"{score!r} disagrees with num_mc_correct/num_mc_total = {correct}/{total}")
        return correct, total
    if score is None:
        return None, None
    if not 0.0 <= score <= 1.0:
        raise fail(rid, f"{field}.score", f"an MC score must lie in [0, 1], got {score!r}")
    if mc_total is None:
        raise fail(rid, f"{field}.score", "only a fraction is stored; pass mc_total= (rollouts per step)")
    k = score * mc_total
    if abs(k - round(k)) > 1e-6 * max(1, mc_total):
        raise fail(rid, f"{field}.score", f"{score!r} is not a multiple of 1/{mc_total}; pass the right mc_total=")
    return int(round(k)), int(mc_total)


def parse_listish(v: Any, rid: str, field: str) -> Any:
    """A list stored as a list, a JSON string or a Python-literal string (``"['Reasoning', 0]"``)."""
    if not isinstance(v, str):
        return v
    s = v.strip()
    if s in ("", "None", "null", "none"):
        return None
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        raise fail(rid, field, f"cannot parse {v!r}") from None


# -- chat transcripts -----------------------------------------------------------------------------------
_QA_RE = re.compile(r"^\s*###\s*Question:\s*(.*?)\s*###\s*Solution Process:\s*?\n?(.*)$", re.S)
_IMAGE_TOKEN_RE = re.compile(r"<image>\s*")
POSITIVE_TOKENS = ("+", "<+>")
NEGATIVE_TOKENS = ("-", "<->")


def turn_text(content: Any) -> str | None:
    """Text of a chat turn: a string, or the joined ``type == "text"`` parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [c.get("text") for c in content if isinstance(c, dict) and c.get("type") == "text"]
        parts = [p for p in parts if isinstance(p, str)]
        return "".join(parts) if parts else None
    return None


def split_question(text: str, rid: str, field: str) -> tuple[str, str]:
    """Split the first PRM user turn ``### Question:\\n{q}\\n\\n### Solution Process:\\n{step}``."""
    m = _QA_RE.match(text)
    if not m:
        raise fail(rid, field, "first user turn must read '### Question:\\n...\\n\\n### Solution Process:\\n...'")
    return m.group(1), m.group(2)


def strip_image_tokens(question: str) -> str:
    return _IMAGE_TOKEN_RE.sub("", question).strip()


def token_label(text: Any, rid: str, field: str) -> int:
    t = text.strip() if isinstance(text, str) else text
    if t in POSITIVE_TOKENS:
        return 1
    if t in NEGATIVE_TOKENS:
        return 0
    raise fail(rid, field, f"assistant turn must be '+' or '-', got {text!r}")


def chat_pairs(turns: Iterable[tuple[str, Any]], rid: str, field: str) -> list[tuple[str, int, int]]:
    """``[(role, text_or_content)]`` -> ``[(user_text, label, turn_index)]``; system turns skipped.
    Roles accepted: user/human and assistant/gpt."""
    out = []
    pending: tuple[str, int] | None = None
    for i, (role, content) in enumerate(turns):
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role == "system":
            continue
        text = turn_text(content)
        if role == "user":
            if pending is not None:
                raise fail(rid, f"{field}[{i}]", "two user turns in a row (a step without its '+'/'-' turn)")
            if text is None:
                raise fail(rid, f"{field}[{i}]", "user turn has no text")
            pending = (text, i)
        elif role == "assistant":
            if pending is None:
                raise fail(rid, f"{field}[{i}]", "assistant turn without a preceding user turn")
            out.append((pending[0], token_label(text, rid, f"{field}[{i}]"), pending[1]))
            pending = None
        else:
            raise fail(rid, f"{field}[{i}]", f"unknown role {role!r}")
    if pending is not None:
        raise fail(rid, f"{field}[{pending[1]}]", "last user turn has no '+'/'-' answer")
    if not out:
        raise fail(rid, field, "no (user, assistant) step turns")
    return out
