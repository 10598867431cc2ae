"""The small helpers every layer shares, each defined once: atomic writes, F1 from counts (checked
against scikit-learn), plain-text tables, dtype names, lazy package faces, vision layouts."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxprm.atomic import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text
from jaxprm.dtypes import float_dtype
from jaxprm.reporting import binary_f1, format_table, precision_recall_f1, two_class_f1


# -- atomic writes ------------------------------------------------------------------------------------
def test_atomic_writes_replace_the_file_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"a": 1}, indent=2)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    # mkstemp makes 0600 files; the copies that wrote through it left them unreadable to the group
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    assert os.listdir(path.parent) == ["out.json"]


def test_atomic_write_failure_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("partial\n")
            raise RuntimeError("killed")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(path, "a"):
            pass


def test_record_writers_are_atomic_and_one_function(tmp_path):
    from jaxprm.data import synthetic as syn
    from jaxprm.data.formats import read_jsonl, write_jsonl

    recs = syn.generate_records(3, seed=0)
    out = tmp_path / "r.jsonl"
    assert syn.write_jsonl(recs, str(out)) == 3  # the synthetic CLI writes through data.formats.write_jsonl
    assert [r.id for r in read_jsonl(str(out))] == [r.id for r in recs]
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask
    assert write_jsonl(recs[:1], out) == 1 and len(out.read_text().splitlines()) == 1


# -- F1 from counts: scikit-learn's numbers ------------------------------------------------------------
CASES = [  # (y_true, y_pred) with 1 the counted class
    ([1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 1, 1, 0, 0]),
    ([1, 1, 1, 1], [1, 1, 1, 1]),  # the other class absent from both
    ([0, 0, 0], [0, 0, 0]),  # the counted class absent from both
    ([1, 0, 1, 0], [0, 1, 0, 1]),  # all wrong
    ([0, 0, 1], [1, 1, 1]),
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
]


def _counts(y_true, y_pred):
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return (int(((t == 1) & (p == 1)).sum()), int(((t == 0) & (p == 1)).sum()), int(((t == 1) & (p == 0)).sum()),
            int(((t == 0) & (p == 0)).sum()))


@pytest.mark.parametrize("y_true, y_pred", CASES)
def test_f1_from_counts_matches_sklearn(y_true, y_pred):
    metrics = pytest.importorskip("sklearn.metrics")
    tp, fp, fn, tn = _counts(y_true, y_pred)
    kw = dict(labels=[0, 1], zero_division=0)
    f1_pos = metrics.f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0)
    f1_neg = metrics.f1_score(y_true, y_pred, pos_label=0, average="binary", zero_division=0)
    assert binary_f1(tp, fp, fn) == pytest.approx(f1_pos, abs=1e-12)
    r = two_class_f1(tp, fp, fn, tn)
    assert r["f1"] == pytest.approx(f1_pos, abs=1e-12) and r["f1_other"] == pytest.approx(f1_neg, abs=1e-12)
    assert r["macro_f1"] == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro", **kw), abs=1e-12)
    assert r["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred), abs=1e-12)
    prf = precision_recall_f1(tp, fp, fn)
    assert prf["precision"] == pytest.approx(metrics.precision_score(y_true, y_pred, zero_division=0), abs=1e-12)
    assert prf["recall"] == pytest.approx(metrics.recall_score(y_true, y_pred, zero_division=0), abs=1e-12)
    assert prf["f1"] == pytest.approx(f1_pos, abs=1e-12) and prf["support"] == sum(y_true)

    # the training metrics ("-" is the counted class, summed on device) and the benchmark metric agree
    from jaxprm.eval.step_f1 import visualprocessbench_f1
    from jaxprm.models.prm import f1_from_counts

    m = f1_from_counts({"tp_neg": tp, "fp_neg": fp, "fn_neg": fn, "tn_neg": tn})
    assert m == {"acc": r["accuracy"], "f1_neg": r["f1"], "f1_pos": r["f1_other"], "macro_f1": r["macro_f1"]}
    # VisualProcessBench: "correct" (gold 1 / score >= 0.5) is the counted class
    v = visualprocessbench_f1([0.9 if p else 0.1 for p in y_pred], [1 if t else -1 for t in y_true])
    assert (v["f1_correct"], v["f1_incorrect"], v["macro_f1"], v["accuracy"]) == pytest.approx(
        (f1_pos, f1_neg, r["macro_f1"], r["accuracy"]), abs=1e-12)


def test_f1_without_samples_is_zero():
    assert two_class_f1(0, 0, 0, 0) == {"f1": 0.0, "f1_other": 0.0, "macro_f1": 0.0, "accuracy": 0.0}


# -- tables ---------------------------------------------------------------------------------------------
def test_format_table_aligns_names_left_and_numbers_right():
    text = format_table(["rule", "n", "acc"], [["mc", 12, 0.5], ["hybrid", 3, float("nan")], ["j", 100, "0.125"]])
    assert text.splitlines() == [
        "rule      n     acc",
        "-------------------",
        "mc       12  0.5000",
        "hybrid    3     nan",
        "j       100   0.125",
    ]
    assert format_table(["a", "bb"], []).splitlines() == ["a  bb", "-----"]


def test_synth_report_table_uses_the_shared_format():
    """The synthesis report right-aligned its rule names and had no rule line; eval's tables did
    both the other way. Both now come from ``jaxprm.reporting.format_table``."""
    from jaxprm.synth.report import format_table as report_table

    m = {"coverage": 1.0, "accuracy": 0.5, "wrong": 2, "neg": {"f1": 0.25, "precision": 0.5, "recall": 1 / 6},
         "recall_neg_all": 0.1, "by_kind": {"perception": None, "reasoning": 0.75}, "first_error_match": 0.0}
    rep = {"records": 2, "records_with_ground_truth": 2, "steps": 8, "negative_steps": 3, "traces_with_error": 1,
           "rules": {"mc": m, "vlprm_v2": m}}
    lines = report_table(rep).splitlines()
    assert lines[0].startswith("records 2") and lines[1].split()[:3] == ["rule", "coverage", "accuracy"]
    assert set(lines[2]) == {"-"} and lines[3].startswith("mc ") and lines[4].startswith("vlprm_v2 ")
    assert lines[3].split() == ["mc", "1.000", "0.500", "2", "0.250", "0.500", "0.167", "0.100", "-", "0.750",
                                "0.000"]


# -- dtype names -----------------------------------------------------------------------------------------
def test_dtype_names_and_aliases():
    import ml_dtypes

    assert float_dtype("float32") == np.float32 and float_dtype("FP32") == np.float32
    assert float_dtype("bf16") == float_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    assert float_dtype("f16") == np.float16 and float_dtype(np.float64) == np.float64
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        float_dtype("int8")
    with pytest.raises(ValueError, match="floating"):
        float_dtype(np.int32)
    with pytest.raises(TypeError):
        float_dtype(object())
    from jaxprm.data.pipeline import PipelineConfig, batch_spec
    from jaxprm.models.qwen2_5_vl.presets import preset

    spec = batch_spec(PipelineConfig(pixel_dtype="bfloat16"), preset("qwen2.5-vl-3b"), 64, 16)
    assert spec["pixel_values"][1] == np.dtype(ml_dtypes.bfloat16)


def test_scoring_dtype_names_give_jax_types():
    import jax.numpy as jnp

    from jaxprm.scoring.prm import _resolve_dtype

    assert _resolve_dtype("bf16") is jnp.bfloat16 and _resolve_dtype("float32") is jnp.float32
    assert _resolve_dtype(jnp.dtype("float16")) is jnp.float16


# -- lazy package faces ------------------------------------------------------------------------------------
def test_lazy_faces_import_on_first_use_and_import_jaxprm_stays_light():
    code = ("import sys, jaxprm, jaxprm.search, jaxprm.models.qwen2_5_vl as q\n"
            "assert 'jax' not in sys.modules, 'import jaxprm imported jax'\n"
            "assert {'load_prm', 'PRM', 'Scorer'} <= set(dir(jaxprm)) and 'Qwen25VL' in dir(q)\n"
            "assert jaxprm.search.best_of_n.__module__ == 'jaxprm.search.search' and 'jax' not in sys.modules\n"
            "assert q.Qwen25VLConfig.__module__.endswith('.config')\n"
            "for mod, name in ((jaxprm, 'nope'), (jaxprm.search, 'nope'), (q, 'nope')):\n"
            "    try:\n"
            "        getattr(mod, name)\n"
            "    except AttributeError as e:\n"
            "        assert str(e) == f\"module {mod.__name__!r} has no attribute 'nope'\", e\n"
            "    else:\n"
            "        raise AssertionError(mod)\n"
            "assert jaxprm.load_prm is jaxprm.search.load_prm and 'load_prm' in vars(jaxprm)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# -- vision layouts: one definition for training batches and the scorer ---------------------------------------
def test_layout_keys_are_defined_once():
    from jaxprm.data import pipeline
    from jaxprm.models import prm
    from jaxprm.models.qwen2_5_vl import model, rope
    from jaxprm.scoring import device

    assert pipeline.LAYOUT_KEYS is model.LAYOUT_KEYS is prm.LAYOUT_KEYS is rope.LAYOUT_KEYS
    assert getattr(device, "LAYOUT_KEYS", rope.LAYOUT_KEYS) is rope.LAYOUT_KEYS  # the scorer goes through PRMModel
    assert tuple(rope.VisionLayout.__dataclass_fields__)[:5] == rope.LAYOUT_KEYS


def test_batched_layouts_equal_per_row_layouts_and_pad_like_a_bigger_bucket():
    from jaxprm.data.pipeline import pad_batch
    from jaxprm.models.qwen2_5_vl.rope import LAYOUT_KEYS, VisionLayouts, pad_layout, vision_layout

    class V:
        spatial_merge_size, window_size, patch_size = 2, 112, 14

    layouts = VisionLayouts(V())
    grids = [np.array([[1, 4, 6]]), None, np.array([[1, 2, 2], [2, 4, 4]])]
    batch = layouts.batch(grids, 56)
    for k in LAYOUT_KEYS:
        assert batch[k].dtype == np.int32 and batch[k].shape[0] == 3
    for r, g in enumerate(grids):
        one = vision_layout(np.zeros((0, 3)) if g is None else g, merge=2, window_size=112, patch_size=14, pad_to=56)
        for k in LAYOUT_KEYS:
            assert np.array_equal(batch[k][r], getattr(one, k)), (r, k)
    # growing a batch to a larger patch bucket (multi-host agreement) = building it in that bucket
    batch.update(input_ids=np.zeros((3, 4), np.int32), segment_ids=np.zeros((3, 4), np.int32),
                 position_ids=np.zeros((3, 3, 4), np.int32), pixel_values=np.zeros((3, 56, 6), np.float32))
    grown, direct = pad_batch(batch, None, 80), layouts.batch(grids, 80)
    for k in LAYOUT_KEYS:
        assert grown[k].dtype == np.int32 and np.array_equal(grown[k], direct[k]), k
    assert layouts(grids[0], 56) is layouts(np.array([[1, 4, 6]]), 56)  # memoised by value
    with pytest.raises(ValueError, match="multiple of 4"):
        pad_batch(batch, None, 62)
    with pytest.raises(ValueError, match="cannot pad a layout of 56 patches to 42"):
        pad_layout(batch, 42, 2)


def test_atomic_json_of_eval_results(tmp_path):
    from jaxprm.eval.run import _write_json

    _write_json(str(tmp_path / "r.json"), {"x": np.float32(0.5), "a": np.arange(2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 0.5, "a": [0, 1]}
