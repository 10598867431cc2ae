"""load_prm on bad directories (issue 12, items 2, 3 and 17): every failure is one clear error naming
the file (and the tensor), exports are atomic, a jaxprm export without prm.json is an error while a
plain HF directory gets the documented default spec (said once in the log), and label ids outside the
vocabulary or not the tokenizer's "+"/"-" are refused at load time.

One tiny export with random weights (numpy values on ``eval_shape`` shapes: no slow initialisers) is
built per module; each test copies it and breaks one thing.
"""
import dataclasses
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import jaxprm
from jaxprm import checkpointing as ck
from jaxprm.data.prompt import label_token_ids
from jaxprm.models.prm import PRMSpec
from jaxprm.models.qwen2_5_vl.convert import (
    read_safetensors,
    write_safetensors,
    written_by_jaxprm,
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(export dir, model, tokenizer) of a tiny random PRM with a linear head."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm.data import synthetic as syn
    from jaxprm.data.preprocess import ImageProcessor
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL

    tok = syn.build_synthetic_tokenizer()
    cfg = syn.tiny_model_config(tok)
    spec = ck.default_spec(tok, head="linear")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg), spec)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(x.dtype)), state)
    model = nnx.merge(graphdef, state)
    d = str(tmp_path_factory.mktemp("exp") / "prm")
    assert ck.export_hf(model, tok, ImageProcessor(), d) == d
    return d, model, tok


def _copy(export, tmp_path, name="copy"):
    d = str(tmp_path / name)
    shutil.copytree(export[0], d)
    return d


def _load(d):
    return ck.load_prm_model(d)


# ------------------------------------------------------------------------------------------------
# item 3: atomic export; a jaxprm export without prm.json is an error; HF dir gets the default
# ------------------------------------------------------------------------------------------------
def test_export_is_atomic_and_replaces(export, tmp_path, monkeypatch):
    _, model, tok = export
    out = str(tmp_path / "out")
    from jaxprm.data.preprocess import ImageProcessor

    ck.export_hf(model, tok, ImageProcessor(), out)
    before = _read_all(out)
    assert "prm.json" in before and written_by_jaxprm(os.path.join(out, "model.safetensors"))

    # a failure halfway (after the weights, before prm.json) leaves the old export as it was, no debris
    def boom(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(PRMSpec, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.export_hf(model, tok, ImageProcessor(), out)
    monkeypatch.undo()
    assert _read_all(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # and a failure on a fresh target leaves nothing at all
    monkeypatch.setattr(PRMSpec, "save", boom)
    with pytest.raises(OSError):
        ck.export_hf(model, tok, ImageProcessor(), str(tmp_path / "fresh"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # a second export replaces the first
    ck.export_hf(model, tok, ImageProcessor(), out)
    assert sorted(os.listdir(out)) == sorted(before) and sorted(os.listdir(tmp_path)) == ["out"]


def test_export_without_prm_json_is_an_error(export, tmp_path):
    d = _copy(export, tmp_path)
    os.remove(os.path.join(d, "prm.json"))
    with pytest.raises(FileNotFoundError, match=r"prm\.json is missing.*jaxprm export"):
        _load(d)
    os.remove(os.path.join(d, "step_head.safetensors"))  # still marked by model.safetensors' metadata
    with pytest.raises(FileNotFoundError, match=r"prm\.json is missing.*model\.safetensors"):
        _load(d)


def test_workdir_assets_without_prm_json_is_an_error(export, tmp_path):
    d = _copy(export, tmp_path, "assets")
    os.remove(os.path.join(d, "prm.json"))
    with pytest.raises(FileNotFoundError, match=r"prm\.json is missing"):
        ck.load_assets(d, jaxprm_dir=True)


def test_hf_dir_without_prm_json_gets_default_spec_logged_once(export, tmp_path, caplog):
    d = _copy(export, tmp_path)
    os.remove(os.path.join(d, "prm.json"))
    os.remove(os.path.join(d, "step_head.safetensors"))
    p = os.path.join(d, "model.safetensors")
    write_safetensors(p, {k: np.array(v) for k, v in read_safetensors(p).items()})  # as transformers writes it
    assert not written_by_jaxprm(p)
    with caplog.at_level(logging.INFO, logger="jaxprm.checkpointing"):
        model, tok, _ = _load(d)
    assert model.spec == ck.default_spec(tok)
    said = [r for r in caplog.records if "no prm.json" in r.getMessage()]
    assert len(said) == 1 and d in said[0].getMessage()


# ------------------------------------------------------------------------------------------------
# item 2: label ids
# ------------------------------------------------------------------------------------------------
def _read_all(d):
    return {f: Path(d, f).read_bytes() for f in os.listdir(d)}


def _edit_spec(d, **kw):
    p = Path(d, "prm.json")
    p.write_text(json.dumps({**json.loads(p.read_text()), **kw}))


@pytest.mark.parametrize("bad", [{"plus_id": 10**6}, {"minus_id": -1}, {"plus_id": 3.5}])
def test_label_ids_outside_vocabulary(export, tmp_path, bad):
    d = _copy(export, tmp_path)
    _edit_spec(d, **bad)
    with pytest.raises(ValueError, match=r"prm\.json.*(outside the vocabulary|>= 0|int token id)"):
        _load(d)


def test_label_ids_not_the_tokenizers(export, tmp_path):
    d = _copy(export, tmp_path)
    plus, minus = label_token_ids(export[2])
    _edit_spec(d, plus_id=minus, minus_id=plus)  # in the vocabulary, but swapped
    with pytest.raises(ValueError, match=r'prm\.json.*tokenizer\'s "\+" and "-" tokens'):
        _load(d)


def test_spec_ids_checked_against_embedding(export):
    from jaxprm.models.prm import PRMModel

    model = export[1]
    vocab = model.backbone.config.text.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PRMModel(model.backbone, dataclasses.replace(model.spec, plus_id=vocab))
    with pytest.raises(ValueError, match=">= 0"):
        PRMSpec(plus_id=-2, minus_id=5)


# ------------------------------------------------------------------------------------------------
# item 17: corrupt files name the file (and the tensor)
# ------------------------------------------------------------------------------------------------
def _rewrite_header(p, mutate):
    raw = Path(p).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    Path(p).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


@pytest.mark.parametrize("garbage", [
    b"\xff" * 8 + b"x" * 64,  # header length 2**64-1 (was OverflowError / MemoryError)
    struct.pack("<Q", 40) + b"{not json" + b" " * 31 + b"\0" * 16,
    struct.pack("<Q", 8) + b"[1, 2]  ",
    b"abc",
])
def test_garbage_safetensors_header(export, tmp_path, garbage):
    d = _copy(export, tmp_path)
    p = os.path.join(d, "model.safetensors")
    Path(p).write_bytes(garbage)
    with pytest.raises(ValueError, match=rf"{p}: (not a safetensors file|corrupt safetensors header)"):
        jaxprm.load_prm(d)


def test_tensor_shape_does_not_fit_its_bytes(export, tmp_path):
    d = _copy(export, tmp_path)
    p = os.path.join(d, "model.safetensors")
    name = "model.language_model.norm.weight"
    _rewrite_header(p, lambda h: h[name].__setitem__("shape", [h[name]["shape"][0] + 3]))
    with pytest.raises(ValueError, match=rf"{p}: tensor '{name}'.*needs .* bytes"):
        _load(d)


def test_tensor_shape_does_not_fit_the_model(export, tmp_path):
    d = _copy(export, tmp_path)
    p = os.path.join(d, "model.safetensors")
    t = {k: np.array(v) for k, v in read_safetensors(p).items()}
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    t2 = dict(t)
    t2[name] = t[name][:-1]  # one row short, in one layer
    write_safetensors(p, t2)
    with pytest.raises(ValueError, match=rf"{d}: tensor '{name}' has shape \(63, 64\).*layer 1"):
        _load(d)
    t2 = dict(t)
    t2["model.language_model.norm.weight"] = np.zeros((3,), np.float32)  # consistent file, wrong for config
    write_safetensors(p, t2)
    with pytest.raises(ValueError, match=rf"{d}: tensor 'model.language_model.norm.weight' .*\(3,\).*config"):
        _load(d)


def test_step_head_wrong_shape_and_missing_tensor(export, tmp_path):
    d = _copy(export, tmp_path)
    p = os.path.join(d, "step_head.safetensors")
    write_safetensors(p, {"step_head": np.zeros((3, 2), np.float32), "step_bias": np.zeros((2,), np.float32)})
    with pytest.raises(ValueError, match=rf"{p}: tensor 'step_head' has shape \(3, 2\)"):
        _load(d)
    write_safetensors(p, {"step_head": np.zeros((64, 2), np.float32)})
    with pytest.raises(ValueError, match=rf"{p}: no tensor 'step_bias'"):
        _load(d)


@pytest.mark.parametrize("fname", ["prm.json", "preprocessor_config.json", "config.json"])
@pytest.mark.parametrize("content", ['{"plus_id": 1,', "[1, 2]", "\udcff"])
def test_garbled_json_names_the_file(export, tmp_path, fname, content):
    d = _copy(export, tmp_path)
    p = os.path.join(d, fname)
    with open(p, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(content)
    with pytest.raises(ValueError, match=rf"{p}"):
        _load(d)


def test_unknown_or_mistyped_prm_json_key(export, tmp_path):
    d = _copy(export, tmp_path)
    _edit_spec(d, heads="linear")
    with pytest.raises(ValueError, match=r"prm\.json: unknown field\(s\) \['heads'\]"):
        _load(d)
    d = _copy(export, tmp_path, "c2")
    _edit_spec(d, head=["linear"])
    with pytest.raises(ValueError, match=r"prm\.json: PRM head must be one of"):
        _load(d)
    d = _copy(export, tmp_path, "c3")
    Path(d, "prm.json").write_text(json.dumps({"head": "linear"}))
    with pytest.raises(ValueError, match=r"prm\.json: missing field\(s\) \['minus_id', 'plus_id'\]"):
        _load(d)
