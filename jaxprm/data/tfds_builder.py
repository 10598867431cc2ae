"""Records -> a TFDS dataset stored as ArrayRecord, written and read without TensorFlow.

On-disk format (``{data_dir}/{name}/{version}/``, a normal TFDS dataset directory)::

    dataset_info.json, features.json, metadata.json (the build report)
    {name}-{split}.array_record-XXXXX-of-YYYYY

One example per record, features (all TF-free TFDS feature connectors)::

    id      Text                       the record id (kept apart so a record whose JSON is broken
                                       can still be named in a log line)
    record  Text                       json.dumps(Record.to_dict()) with "images" emptied
    images  Sequence(Scalar(object))   the encoded image bytes (PNG/JPEG/... as given), in order

Read it back with ``tfds.data_source(name, split=..., data_dir=...)`` (random access, what the
Grain pipeline in ``jaxprm.data.pipeline`` uses) or with :func:`read_records`, which returns
``Record`` objects.

Building (:func:`build_dataset`):

* sources: an iterable of ``Record``, a path to a ``.jsonl`` of ``Record.to_dict()`` lines (or a list
  of them), or a mapping ``{split: source}`` for explicit splits. With one source, ``splits=``
  fractions (or ``val_fraction=``) assign every record to a split by a hash of its id and
  ``split_seed``: stable across rebuilds and independent of record order (so a small split may be a
  little larger or smaller than its fraction, and can be empty for tiny datasets).
* every record is validated (``Record.validate``; image paths are read into bytes, relative ones
  resolved against ``image_root`` or the jsonl file's folder, and one outside that folder (``../``,
  an absolute path) refused unless ``allow_images_outside_root``; each image must decode with Pillow;
  ids must be unique). A bad record is skipped: one ``logging.warning`` line naming its id and
  where it came from (``file.jsonl:17`` or ``records[17]``) and the reason, and it is counted in
  the returned :class:`BuildResult` and in ``metadata.json``. ``validate=False`` skips these checks
  (records are still serialised; only an unreadable image *file* or an unserialisable record is
  skipped) -- meant for tests of the loader's own error handling.
* atomic: TFDS writes into a private temporary folder ``{data_dir}/{name}/.building-*/`` that is
  renamed into place only when every split is complete, so an interrupted build leaves no
  half-written dataset (the leftover temporary folder is removed by the next build).
  An existing dataset of the same name/version raises ``FileExistsError`` unless ``overwrite=True``.
* one build at a time per ``{data_dir}/{name}``: a build holds an exclusive ``flock`` on
  ``{data_dir}/{name}/.build.lock`` throughout; a second, concurrent build waits for it, then
  returns the dataset the first one finished (or rebuilds it with ``overwrite=True``). Temporary
  folders are named ``.building-{pid}-{random}``, and a build removes only those whose pid is no
  longer alive.

Why a custom builder instead of ``tfds.dataset_builders.store_as_tfds_dataset``: in TFDS 4.9.10 the
ad-hoc builder probes ``isinstance(x, tf.data.Dataset)`` (importing TensorFlow) and its
``code_path`` needs the ``importlib_resources`` backport, which TFDS only declares for Python < 3.9.
The subclass below avoids both and otherwise is TFDS' own ``AdhocBuilder``/``GeneratorBasedBuilder``
writing ``file_format="array_record"``.

CLI::

    python -m jaxprm.data.tfds_builder --records data.jsonl --data_dir D [--val_fraction 0.05]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

from jaxprm.data.schema import Record, RecordError
from jaxprm.data.jsonl import BadLine, iter_jsonl

log = logging.getLogger(__name__)

DEFAULT_NAME = "prm_records"
DEFAULT_VERSION = "1.0.0"
FEATURE_KEYS = ("id", "record", "images")
_MAX_SKIPS_KEPT = 1000  # skipped-record entries kept in BuildResult / metadata.json (counts are exact)

Source = Union[str, os.PathLike, Iterable[Record], Sequence[Union[str, os.PathLike]]]


# ------------------------------------------------------------------------------------------------
# Serialisation of one record <-> one TFDS example
# ------------------------------------------------------------------------------------------------
def record_to_example(rec: Record) -> dict[str, Any]:
    """The TFDS example (feature dict) of a record whose images are all encoded bytes."""
    for i, im in enumerate(rec.images):
        if not isinstance(im, (bytes, bytearray)):
            raise RecordError(f"record {rec.id!r}: field 'images[{i}]': must be resolved to bytes before writing")
    d = rec.to_dict()
    d["images"] = []
    return {
        "id": str(rec.id),
        "record": json.dumps(d, ensure_ascii=False, default=_json_default),
        "images": [bytes(im) for im in rec.images],
    }


def _json_default(x: Any) -> Any:
    """numpy scalars/arrays in ``meta`` (common in importers) are stored as plain JSON values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"meta value of type {type(x).__name__} is not JSON serialisable")


def _as_str(x: Any) -> str:
    if isinstance(x, (bytes, bytearray, np.bytes_)):
        return bytes(x).decode("utf-8")
    if isinstance(x, np.ndarray) and x.shape == ():
        return _as_str(x.item())
    return str(x)


def example_to_record(ex: Mapping[str, Any], validate: bool = True) -> Record:
    """Inverse of :func:`record_to_example` for an example as TFDS' data source returns it
    (text features come back as ``bytes``). Raises ``RecordError`` on a malformed example."""
    rid = "<no id>"
    try:
        rid = _as_str(ex["id"])
        d = json.loads(_as_str(ex["record"]))
        if not isinstance(d, dict):
            raise RecordError(f"record {rid!r}: the stored record is not a JSON object")
        images = [bytes(im) for im in (ex.get("images") if ex.get("images") is not None else [])]
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - anything wrong with the stored bytes is a malformed record
        raise RecordError(f"record {rid!r}: malformed stored example ({type(e).__name__}: {e})") from None
    d = dict(d)
    d["images"] = []
    if validate:
        rec = Record.from_dict(d)
    else:  # best effort, no validation (still needs the structure)
        from jaxprm.data.schema import Step

        rec = Record(id=d.get("id"), question=d.get("question"), answer=d.get("answer"), source=d.get("source", ""),
                     steps=[Step(**s) for s in d.get("steps") or []], meta=d.get("meta") or {})
    rec.images = images
    if validate:
        rec.validate()
    return rec


def features():
    """The ``tfds.features.FeaturesDict`` of the on-disk format (TF-free connectors only)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "record": tfds.features.Text(),
        "images": tfds.features.Sequence(tfds.features.Scalar(dtype=np.object_)),
    })


# ------------------------------------------------------------------------------------------------
# Build report
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SkippedRecord:
    split: str
    id: str
    where: str
    reason: str


@dataclasses.dataclass
class BuildResult:
    """What :func:`build_dataset` wrote. ``os.fspath(result)`` / ``str(result)`` is the dataset
    directory ``{data_dir}/{name}/{version}`` (so it can be passed wherever a path is expected)."""

    path: str
    data_dir: str
    name: str
    version: str
    num_examples: dict[str, int]
    num_skipped: dict[str, int]
    skipped: list[SkippedRecord] = dataclasses.field(default_factory=list)  # the first 1000

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    @property
    def total_skipped(self) -> int:
        return sum(self.num_skipped.values())


# ------------------------------------------------------------------------------------------------
# Reading sources
# ------------------------------------------------------------------------------------------------
def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


@dataclasses.dataclass
class _Item:
    """One entry of a source: a parsed record or the error that stopped it, with its origin."""

    where: str
    key: str  # what the split hash uses (the id when known, else ``where``)
    record: Record | None = None
    error: str | None = None
    rid: str = "<no id>"
    base_dir: str | None = None  # folder relative image paths are resolved against (jsonl sources)


def _iter_jsonl(path: str, validate: bool) -> Iterator[_Item]:
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    for where, d in iter_jsonl(path, name=name):
        if isinstance(d, BadLine):
            yield _Item(where, where, error=f"malformed record: {d.message}", base_dir=base)
            continue
        rid = d.get("id") if isinstance(d, dict) else None
        rid_s = rid if isinstance(rid, str) and rid else "<no id>"
        key = rid_s if rid_s != "<no id>" else where
        try:
            if validate:
                rec = Record.from_dict(d)
            else:
                rec = _record_from_dict_unchecked(d)
        except (RecordError, TypeError, ValueError, AttributeError) as e:
            yield _Item(where, key, error=f"malformed record: {e}", rid=rid_s, base_dir=base)
            continue
        yield _Item(where, key, record=rec, rid=rid_s, base_dir=base)


def _record_from_dict_unchecked(d: Any) -> Record:
    """``Record.from_dict`` without its final ``validate()`` (for ``validate=False`` builds)."""
    import base64

    from jaxprm.data.schema import Step

    if not isinstance(d, dict):
        raise RecordError(f"a record must be a JSON object, got {type(d).__name__}")
    images = []
    for im in d.get("images") or []:
        if isinstance(im, dict) and "bytes" in im:
            images.append(base64.b64decode(im["bytes"]))
        elif isinstance(im, dict) and "path" in im:
            images.append(im["path"])
        else:
            images.append(im)
    return Record(id=d.get("id"), question=d.get("question"), steps=[Step(**s) for s in d.get("steps") or []],
                  images=images, answer=d.get("answer"), source=d.get("source", ""), meta=d.get("meta") or {})


def _iter_source(source: Source, validate: bool) -> Iterator[_Item]:
    if _is_pathlike(source):
        yield from _iter_jsonl(os.fspath(source), validate)
        return
    if isinstance(source, Sequence) and source and all(_is_pathlike(s) for s in source):
        for p in source:
            yield from _iter_jsonl(os.fspath(p), validate)
        return
    for i, rec in enumerate(source):
        where = f"records[{i}]"
        if not isinstance(rec, Record):
            yield _Item(where, where, error=f"malformed record: expected a Record, got {type(rec).__name__}")
            continue
        rid = rec.id if isinstance(rec.id, str) and rec.id else "<no id>"
        yield _Item(where, rid if rid != "<no id>" else where, record=rec, rid=rid)


def _reiterable(source: Source) -> Source:
    """A one-shot iterator is materialised (each split reads the source once)."""
    if _is_pathlike(source) or isinstance(source, (Sequence, Mapping)):
        return source
    if iter(source) is source:
        return list(source)
    return source


def split_of(key: str, fractions: Sequence[tuple[str, float]], seed: int = 0) -> str:
    """The split a record id falls in: a stable hash of ``(seed, key)`` against cumulative fractions."""
    h = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    acc = 0.0
    for name, frac in fractions:
        acc += frac
        if u < acc:
            return name
    return fractions[-1][0]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def check_image_bytes(data: bytes) -> tuple[int, int]:
    """Raise ``ValueError`` unless ``data`` is an image Pillow can fully decode; return (width, height)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ValueError(f"cannot decode ({len(data)} bytes): {type(e).__name__}: {e}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"image has size {w}x{h}")
    return w, h


def _resolve_images(rec: Record, image_root: str | None, base_dir: str | None, validate: bool,
                    allow_outside_root: bool = False) -> list[bytes]:
    """The image bytes of ``rec``. Paths go through ``formats.resolve_image`` with ``image_root``
    (default: the jsonl file's folder), so one outside it is refused unless ``allow_outside_root``."""
    from jaxprm.data.formats._common import resolve_image

    root = image_root or base_dir
    out = []
    for i, im in enumerate(rec.images):
        if isinstance(im, (bytes, bytearray)):
            data = bytes(im)
        elif isinstance(im, (str, os.PathLike)):
            p = os.fspath(im)
            path = resolve_image(p, root, allow_outside_root)  # ImagePathError (a ValueError): a counted skip
            if not os.path.isfile(path):
                raise ValueError(f"images[{i}]: image file not found: {p!r}")
            with open(path, "rb") as fh:
                data = fh.read()
        else:
            raise ValueError(f"images[{i}]: expected bytes or a path, got {type(im).__name__}")
        if validate:
            try:
                check_image_bytes(data)
            except ValueError as e:
                raise ValueError(f"corrupt image images[{i}]: {e}") from None
        out.append(data)
    return out


# ------------------------------------------------------------------------------------------------
# The TFDS builder
# ------------------------------------------------------------------------------------------------
def _builder_class():
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.dataset_builders import adhoc_builder

    class PrmRecordsBuilder(adhoc_builder.AdhocBuilder, skip_registration=True):
        """TFDS' ad-hoc builder without its TF probe and without the ``importlib_resources`` need."""

        code_path = None  # no checksums file to look up (TFDS' lookup needs importlib_resources)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=self._description,
                features=self._feature_spec,
                homepage=self._homepage,
                citation=self._citation,
                disable_shuffling=self._disable_shuffling,
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: gen() for split, gen in self._split_datasets.items()}

    return PrmRecordsBuilder


class _SplitWriter:
    """Yields the TFDS examples of one split, skipping (and reporting) bad records."""

    def __init__(self, split, source, fractions, split_seed, image_root, validate, progress, report, seen_ids,
                 allow_outside_root=False):
        self.split, self.source, self.fractions, self.split_seed = split, source, fractions, split_seed
        self.image_root, self.validate, self.progress = image_root, validate, progress
        self.allow_outside_root = allow_outside_root
        self.report, self.seen_ids = report, seen_ids

    def _skip(self, item: _Item, reason: str) -> None:
        r = self.report
        r["num_skipped"][self.split] = r["num_skipped"].get(self.split, 0) + 1
        if len(r["skipped"]) < _MAX_SKIPS_KEPT:
            r["skipped"].append(SkippedRecord(self.split, item.rid, item.where, reason))
        log.warning("tfds_builder: skipping record %r (%s) in split %r: %s", item.rid, item.where, self.split, reason)

    def __call__(self) -> Iterator[tuple[int, dict]]:
        items = _iter_source(self.source, self.validate)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            total = len(self.source) if isinstance(self.source, Sequence) and not _is_pathlike(self.source) else None
            bar = tqdm(total=total, desc=f"{self.split}", unit="rec", leave=False)
        n = 0
        try:
            for ordinal, item in enumerate(items):
                if bar is not None:
                    bar.update(1)
                if self.fractions is not None and split_of(item.key, self.fractions, self.split_seed) != self.split:
                    continue
                if item.error is not None:
                    self._skip(item, item.error)
                    continue
                rec = item.record
                if self.validate:
                    try:
                        rec.validate()
                    except RecordError as e:
                        self._skip(item, f"malformed record: {e}")
                        continue
                    if rec.id in self.seen_ids:
                        self._skip(item, f"duplicate id (first seen at {self.seen_ids[rec.id]})")
                        continue
                try:
                    images = _resolve_images(rec, self.image_root, item.base_dir, self.validate,
                                             self.allow_outside_root)
                    ex = record_to_example(dataclasses.replace(rec, images=images))
                except (ValueError, OSError, TypeError, RecordError) as e:
                    self._skip(item, str(e))
                    continue
                if self.validate:
                    self.seen_ids[rec.id] = item.where
                n += 1
                yield ordinal, ex
        finally:
            if bar is not None:
                bar.close()
        if n == 0:  # TFDS cannot write an empty split
            raise ValueError(f"split {self.split!r}: no valid records to write "
                             f"({self.report['num_skipped'].get(self.split, 0)} skipped)")
        self.report["num_examples"][self.split] = n


def _normalise_splits(records, splits, val_fraction) -> tuple[dict[str, Source], list[tuple[str, float]] | None]:
    """-> ({split: source}, fractions or None)."""
    if records is None:
        if not isinstance(splits, Mapping) or not splits:
            raise ValueError("give records=, or splits={split: source}")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in splits.values()):
            raise ValueError("splits= holds fractions but no records= were given")
        return {str(k): _reiterable(v) for k, v in splits.items()}, None
    if isinstance(records, Mapping):
        if splits is not None or val_fraction is not None:
            raise ValueError("records={split: source} already names the splits; drop splits=/val_fraction=")
        return {str(k): _reiterable(v) for k, v in records.items()}, None
    if splits is not None and val_fraction is not None:
        raise ValueError("give splits= fractions or val_fraction=, not both")
    if val_fraction is not None:
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        splits = {"train": 1.0 - float(val_fraction), "validation": float(val_fraction)}
        if val_fraction == 0:
            splits = {"train": 1.0}
    if splits is None:
        splits = {"train": 1.0}
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"splits must be a non-empty mapping, got {splits!r}")
    fr = []
    for k, v in splits.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"with records= given, splits must map split names to fractions >= 0; got {k}: {v!r}")
        fr.append((str(k), float(v)))
    total = sum(v for _, v in fr)
    if not abs(total - 1.0) < 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total}")
    src = _reiterable(records)
    return {k: src for k, _ in fr}, fr


def _drop_empty_splits(sources: dict[str, Source], fractions, split_seed: int, validate: bool) -> dict[str, Source]:
    """Leave out splits that would get no record at all (TFDS cannot write an empty split)."""
    if fractions is not None and len(fractions) > 1:
        counts = collections.Counter(split_of(it.key, fractions, split_seed)
                                     for it in _iter_source(next(iter(sources.values())), validate))
        empty = [k for k in sources if counts[k] == 0]
    else:
        empty = [k for k, v in sources.items()
                 if isinstance(v, Sequence) and not _is_pathlike(v) and len(v) == 0]
    for k in empty:
        log.warning("tfds_builder: split %r gets no records; it is not written", k)
    out = {k: v for k, v in sources.items() if k not in empty}
    if not out:
        raise ValueError("no records to write")
    return out


_LOCK_NAME = ".build.lock"  # flock'ed for the whole of a build (one build per {data_dir}/{name} at a time)


def _tmp_name(kind: str = "building") -> str:
    """A temporary folder name unique to this build: ``.{kind}-{pid}-{random}`` (the pid says whose it is)."""
    return f".{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _tmp_owner(entry: str) -> int | None:
    """The owner pid in a ``.building-{pid}-{rand}`` / ``.building-old-{pid}-{rand}`` name; None when the
    name carries none (an older build's ``.building-{hex}``)."""
    rest = entry[len(".building-"):]
    if rest.startswith("old-"):
        rest = rest[len("old-"):]
    pid, sep, _ = rest.partition("-")
    return int(pid) if sep and pid.isdigit() else None


def _clean_stale(name_dir: str, keep: Sequence[str] = ()) -> None:
    """Remove the temporary folders of builds that are over: those whose owner pid is no longer
    alive, or whose name carries no pid (left by a build from before pids were recorded). A folder
    whose owner is alive is left alone (a live build, or one this process has not finished)."""
    if not os.path.isdir(name_dir):
        return
    for entry in os.listdir(name_dir):
        if not entry.startswith(".building-") or entry in keep:
            continue
        p = os.path.join(name_dir, entry)
        pid = _tmp_owner(entry)
        if pid is not None and _pid_alive(pid):
            log.info("tfds_builder: leaving %s alone: its build (pid %d) is still running", p, pid)
            continue
        log.info("tfds_builder: removing the leftover of an interrupted build: %s", p)
        shutil.rmtree(p, ignore_errors=True)


class _BuildLock:
    """An exclusive ``fcntl.flock`` on ``{name_dir}/.build.lock``, held for a whole build: a second
    build of the same dataset (another process or thread) waits for the first to finish. Where
    flock is unavailable (no ``fcntl``, or a filesystem that refuses it) the build goes on unlocked
    with a warning; unique temporary names still keep the builds from deleting each other's files."""

    def __init__(self, name_dir: str):
        self.path = os.path.join(name_dir, _LOCK_NAME)
        self.fd: int | None = None
        self.waited = False

    def __enter__(self) -> "_BuildLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            log.warning("tfds_builder: no fcntl here; building %s without a lock", os.path.dirname(self.path))
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.waited = True
                log.info("tfds_builder: another build of %s is running; waiting for it to finish",
                         os.path.dirname(self.path))
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            log.warning("tfds_builder: cannot lock %s (%s); building without a lock", self.path, e)
            return self
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _existing_result(final: str, data_dir: str, name: str, version: str) -> BuildResult:
    """The :class:`BuildResult` of a dataset already on disk (from its ``metadata.json``)."""
    meta = read_metadata(final)
    try:
        sizes = split_sizes(final)
    except Exception:  # noqa: BLE001 - fall back to the build report's counts
        sizes = {}
    num_examples = {str(k): int(v) for k, v in (meta.get("num_examples") or sizes).items()}
    num_skipped = {str(k): int(v) for k, v in (meta.get("num_skipped") or {}).items()}
    skipped = [SkippedRecord(**s) for s in meta.get("skipped") or [] if isinstance(s, dict)]
    return BuildResult(path=final, data_dir=data_dir, name=name, version=version, num_examples=num_examples,
                       num_skipped=num_skipped, skipped=skipped)


def build_dataset(
    records: Source | Mapping[str, Source] | None,
    data_dir: str | os.PathLike,
    *,
    name: str = DEFAULT_NAME,
    splits: Mapping[str, float] | Mapping[str, Source] | None = None,
    val_fraction: float | None = None,
    version: str = DEFAULT_VERSION,
    split_seed: int = 0,
    image_root: str | os.PathLike | None = None,
    validate: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    description: str | None = None,
    source_report: Mapping[str, Any] | None = None,
    allow_images_outside_root: bool = False,
) -> BuildResult:
    """Write ``records`` as the TFDS dataset ``{data_dir}/{name}/{version}`` (ArrayRecord files).

    records: an iterable of ``Record``, a ``.jsonl`` path (or list of paths), or ``{split: source}``;
      or ``None`` with ``splits={split: source}``.
    splits: ``{split: fraction}`` (fractions summing to 1) to divide one source by a hash of the
      record id; default ``{"train": 1.0}``. ``val_fraction=f`` is short for
      ``{"train": 1 - f, "validation": f}``.
    source_report: what reading the source dropped before it got here (e.g. ``{"path", "format",
      "rows", "skipped", "reasons"}`` from an importer's ``ImportStats``), stored as is under
      ``"source"`` in ``metadata.json`` so that the dataset says every skip that went into it.
    allow_images_outside_root: image paths are resolved against ``image_root`` (default: the jsonl
      file's folder) and one that lands outside it (``../``, an absolute path) is a skipped record
      unless this is True.
    Returns a :class:`BuildResult` (path-like: the dataset directory) with per-split example and
    skip counts; the same report is stored in the dataset's ``metadata.json``.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise ValueError(f"name must be a snake_case identifier (letters, digits, '_'), got {name!r}")
    version = str(tfds.core.Version(version))
    sources, fractions = _normalise_splits(records, splits, val_fraction)
    data_dir = os.path.abspath(os.fspath(data_dir))
    name_dir = os.path.join(data_dir, name)
    final = os.path.join(name_dir, version)
    if os.path.exists(final):
        if not overwrite:
            raise FileExistsError(f"dataset {final} already exists; pass overwrite=True to rebuild it")
    sources = _drop_empty_splits(sources, fractions, split_seed, validate)
    os.makedirs(name_dir, exist_ok=True)
    # One build of {name}/{version} at a time: a concurrent build waits here for the lock, then
    # finds the dataset the other one finished (returned as is unless overwrite=True).
    with _BuildLock(name_dir) as lock:
        if os.path.exists(final) and not overwrite:
            log.info("tfds_builder: %s was built by a concurrent build%s; using it", final,
                     " (waited for it)" if lock.waited else "")
            return _existing_result(final, data_dir, name, version)
        _clean_stale(name_dir)

        report: dict[str, Any] = {"num_examples": {}, "num_skipped": {s: 0 for s in sources}, "skipped": []}
        seen_ids: dict[str, str] = {}
        gens = {
            split: _SplitWriter(split, src, fractions, split_seed,
                                None if image_root is None else os.fspath(image_root),
                                validate, progress, report, seen_ids, allow_images_outside_root)
            for split, src in sources.items()
        }
        tmp_root = os.path.join(name_dir, _tmp_name())
        os.makedirs(tmp_root)
        builder_cls = _builder_class()
        holder: dict[str, Any] = {}

        def fill_metadata():
            holder["builder"].info.metadata.update({
                "num_examples": dict(report["num_examples"]),
                "num_skipped": dict(report["num_skipped"]),
                "skipped": [dataclasses.asdict(s) for s in report["skipped"]],
                "split_fractions": None if fractions is None else dict(fractions),
                "split_seed": int(split_seed),
                "validated": bool(validate),
                **({"source": dict(source_report)} if source_report is not None else {}),
            })

        # metadata.json is written with dataset_info.json after the last split, so the last split's
        # generator fills it in once it has finished.
        last = list(gens)[-1]
        last_writer = gens[last]

        def last_then_metadata():
            yield from last_writer()
            fill_metadata()

        gens[last] = last_then_metadata
        had_bar = tqdm_utils._active  # noqa: SLF001 - restore TFDS' global progress-bar setting afterwards
        try:
            builder = builder_cls(
                name=name,
                version=version,
                features=features(),
                split_datasets=gens,
                data_dir=tmp_root,
                description=description or "Step-labelled PRM records (jaxprm.data.schema.Record) with encoded images.",
                file_format="array_record",
                disable_shuffling=True,
            )
            holder["builder"] = builder
            tfds.disable_progress_bar()
            builder.download_and_prepare(
                file_format="array_record",
                download_dir=os.path.join(tmp_root, "downloads"),
            )
            built = os.path.join(tmp_root, name, version)
            if not os.path.isfile(os.path.join(built, "dataset_info.json")):
                raise RuntimeError(f"TFDS did not produce {built}/dataset_info.json")
            if os.path.exists(final):  # overwrite=True: swap the old version out, then the new one in
                old = os.path.join(name_dir, _tmp_name("building-old"))
                os.replace(final, old)
                os.replace(built, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(built, final)
        finally:
            if had_bar:
                tfds.enable_progress_bar()
            shutil.rmtree(tmp_root, ignore_errors=True)

    result = BuildResult(
        path=final,
        data_dir=data_dir,
        name=name,
        version=version,
        num_examples={s: int(report["num_examples"].get(s, 0)) for s in sources},
        num_skipped={s: int(report["num_skipped"].get(s, 0)) for s in sources},
        skipped=list(report["skipped"]),
    )
    log.info("tfds_builder: wrote %s: examples %s, skipped %s", final, result.num_examples, result.num_skipped)
    return result


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def dataset_dir(data: str | os.PathLike, name: str = DEFAULT_NAME, version: str | None = None) -> str:
    """The version directory for ``data`` = a version dir itself, ``{data_dir}/{name}`` or a data_dir root."""
    p = os.fspath(data)
    if os.path.isfile(os.path.join(p, "dataset_info.json")):
        return p
    cand_dirs = [os.path.join(p, name), p]
    for d in cand_dirs:
        if not os.path.isdir(d):
            continue
        if version is not None:
            v = os.path.join(d, str(version))
            if os.path.isfile(os.path.join(v, "dataset_info.json")):
                return v
            continue
        vers = [e for e in os.listdir(d) if os.path.isfile(os.path.join(d, e, "dataset_info.json"))]
        if vers:
            import tensorflow_datasets as tfds

            return os.path.join(d, max(vers, key=lambda s: tfds.core.Version(s)))
    raise FileNotFoundError(f"no TFDS dataset {name!r}{'' if version is None else ':' + str(version)} under {p}")


def data_source(data: str | os.PathLike, split: str, name: str = DEFAULT_NAME, version: str | None = None):
    """TFDS' random-access ArrayRecord data source for one split (``len`` and ``[i]`` -> feature dict).

    Equivalent to ``tfds.data_source(name, split=split, data_dir=...)``, but also accepts the
    dataset's version directory."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(dataset_dir(data, name, version)).as_data_source(split=split)


def split_sizes(data: str | os.PathLike, name: str = DEFAULT_NAME, version: str | None = None) -> dict[str, int]:
    """``{split: number of records}`` of a built dataset (a split with no records may be absent)."""
    import tensorflow_datasets as tfds

    info = tfds.builder_from_directory(dataset_dir(data, name, version)).info
    return {k: int(v.num_examples) for k, v in info.splits.items()}


def read_records(data: str | os.PathLike, split: str, name: str = DEFAULT_NAME, version: str | None = None,
                 validate: bool = True) -> Iterator[Record]:
    """The records of one split, in stored order (raises ``RecordError`` on a malformed one)."""
    src = data_source(data, split, name, version)
    for i in range(len(src)):
        yield example_to_record(src[i], validate=validate)


def read_metadata(data: str | os.PathLike, name: str = DEFAULT_NAME, version: str | None = None) -> dict:
    """The build report stored in ``metadata.json`` (counts of examples/skips per split, skipped ids)."""
    path = os.path.join(dataset_dir(data, name, version), "metadata.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxprm.data.tfds_builder",
                                 description="Write records (jsonl of Record.to_dict()) as a TFDS ArrayRecord dataset.")
    ap.add_argument("--records", required=True, nargs="+", help="one or more .jsonl files")
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--version", default=DEFAULT_VERSION)
    ap.add_argument("--val_fraction", type=float, default=None, help="fraction of records (by id hash) for 'validation'")
    ap.add_argument("--split_seed", type=int, default=0)
    ap.add_argument("--image_root", default=None, help="folder relative image paths are resolved against")
    ap.add_argument("--allow_images_outside_root", "--allow-images-outside-root", action="store_true",
                    help="follow image paths that resolve outside --image_root (default: such records are skipped)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no_validate", action="store_true", help="skip record/image validation (not recommended)")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src = args.records[0] if len(args.records) == 1 else list(args.records)
    try:
        res = build_dataset(src, args.data_dir, name=args.name, version=args.version, val_fraction=args.val_fraction,
                            split_seed=args.split_seed, image_root=args.image_root, validate=not args.no_validate,
                            overwrite=args.overwrite, progress=not args.no_progress,
                            allow_images_outside_root=args.allow_images_outside_root)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res.path}: examples {res.num_examples}, skipped {res.num_skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
