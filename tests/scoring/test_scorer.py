"""jaxprm.load_prm / PRM.score*: parity with transformers, prefix sharing, padding invariance, buckets
without recompilation, loading from a workdir / an export, errors, and the benchmark's CPU smoke run.

One tiny random HF Qwen2.5-VL checkpoint (synthetic tokenizer) is built offline per module; every
PRM built from it shares the same jitted functions (same model graph), warmed up once.
"""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import jaxprm
from jaxprm.data.preprocess import ImageProcessor
from jaxprm.data.prompt import encode_prm_example, label_token_ids
from jaxprm.data.synthetic import build_synthetic_tokenizer, generate_records, tiny_model_config
from jaxprm.scoring import PRM, bucket_size

from tests.models.hf_reference import build_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small bucket set: the synthetic prompts are ~500-660 tokens with a 112x112 image (64 patches, 16
# tokens); candidate continuations after the shared prefix are ~100-250 tokens.
BUCKETS = dict(batch_size=4, batch_buckets=(1, 4), length_buckets=(768,), prefix_buckets=(512,),
               suffix_buckets=(256,), patch_buckets=(64,))


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


@pytest.fixture(scope="module")
def records():
    return generate_records(8, seed=3)


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    """(dir, torch model): a tiny random HF checkpoint + tokenizer + preprocessor config, offline."""
    d = str(tmp_path_factory.mktemp("hf_prm"))
    cfg = transformers.Qwen2_5_VLConfig(**tiny_model_config(tok).to_hf_dict())
    model = build_hf_model(cfg, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    ImageProcessor().save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def prm(hf):
    p = jaxprm.load_prm(hf[0], **BUCKETS)
    assert p.warmup(text_only=False) == 6  # full x3 (rows 1, 4, and 4 sharing one image), prefix x1, suffix x2
    return p


def _steps(rec):
    return [s.text for s in rec.steps]


def _hf_probs(hf_model, tok, images, question, steps):
    """Reference: transformers' logits at the label positions of the same prompt, softmax over (+, -)."""
    ip = ImageProcessor()
    if images:
        out = ip(images)
        pv, grid = out["pixel_values"], out["image_grid_thw"]
    else:
        pv = grid = None
    enc = encode_prm_example(tok, question, steps, image_grid_thw=grid, mode="score")
    ids = torch.tensor(enc.input_ids[None].astype(np.int64))
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_id).int())
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid))
    with torch.no_grad():
        logits = hf_model(**kw).logits[0].double().numpy()
    plus, minus = label_token_ids(tok)
    lg = logits[enc.label_positions][:, [plus, minus]]
    lg = lg - lg.max(-1, keepdims=True)
    return (np.exp(lg[:, 0]) / np.exp(lg).sum(-1)).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def test_import_is_lazy_and_exports_load_prm():
    code = ("import sys, jaxprm; assert 'jax' not in sys.modules, 'import jaxprm pulled in jax'; "
            "assert callable(jaxprm.load_prm) and jaxprm.PRM.__name__ == 'PRM'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert jaxprm.load_prm is jaxprm.scoring.load_prm
    with pytest.raises(AttributeError):
        jaxprm.no_such_name  # noqa: B018


def test_bucket_size():
    assert bucket_size(1, (4, 8)) == 4 and bucket_size(8, (4, 8)) == 8
    assert bucket_size(9, (4, 8)) == 16 and bucket_size(17, (4, 8)) == 24


# ------------------------------------------------------------------------------------------------
# parity with transformers (PyTorch)
# ------------------------------------------------------------------------------------------------
def test_score_matches_hf(prm, hf, tok, records):
    for rec in records[:3]:
        got = prm.score(rec.images[0], rec.question, _steps(rec))
        ref = _hf_probs(hf[1], tok, [rec.images[0]], rec.question, _steps(rec))
        assert got.dtype == np.float32 and got.shape == (len(rec.steps),)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # sanity: the random model does not give constant scores
    assert np.ptp(got) > 1e-4


def test_score_text_only_and_two_images_match_hf(prm, hf, tok, records):
    rec = records[0]
    got = prm.score(None, rec.question, _steps(rec))
    np.testing.assert_allclose(got, _hf_probs(hf[1], tok, [], rec.question, _steps(rec)), atol=1e-5, rtol=0)
    # two 56x56 images: 2 x 16 patches, still the 64-patch bucket
    two = [Image.open(io.BytesIO(r.images[0])).resize((56, 56)) for r in records[:2]]
    got2 = prm.score(two, rec.question, _steps(rec))
    np.testing.assert_allclose(got2, _hf_probs(hf[1], tok, two, rec.question, _steps(rec)), atol=1e-5, rtol=0)
    assert not np.allclose(got2, prm.score(rec.images[0], rec.question, _steps(rec)), atol=1e-4)


def test_image_input_forms_agree(prm, records, tmp_path):
    rec = records[1]
    png = rec.images[0]
    pil = Image.open(io.BytesIO(png))
    path = tmp_path / "img.png"
    path.write_bytes(png)
    ref = prm.score(png, rec.question, _steps(rec))
    for form in (pil, np.asarray(pil.convert("RGB")), str(path), path, [png]):
        np.testing.assert_array_equal(prm.score(form, rec.question, _steps(rec)), ref)


# ------------------------------------------------------------------------------------------------
# prefix sharing and padding invariance
# ------------------------------------------------------------------------------------------------
def test_candidates_share_prefix_and_match_unshared(prm, hf, tok, records, monkeypatch):
    rec = records[0]
    cands = [_steps(r) for r in records[:6]]  # 6 solutions (of other problems too) to one question
    cands.append(cands[0][:2])  # a prefix of another candidate
    prefix_runs = []
    orig = prm.scorer._fns.prefix
    monkeypatch.setattr(prm.scorer._fns, "prefix", lambda *a: prefix_runs.append(1) or orig(*a))
    shared = prm.score_candidates(rec.images[0], rec.question, cands)
    monkeypatch.undo()
    assert len(prefix_runs) == 1  # image + question encoded once for all 7 candidates
    unshared = prm.score_batch([(rec.images[0], rec.question, c) for c in cands])
    assert [len(s) for s in shared] == [len(c) for c in cands]
    for a, b in zip(shared, unshared):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(shared[0], _hf_probs(hf[1], tok, [rec.images[0]], rec.question, cands[0]),
                               atol=1e-5, rtol=0)
    # the verified shared prefix is system + image + question, up to "### Solution Process:\n"
    enc = [prm._encode(*prm._images(rec.images[0]), rec.question, c) for c in cands]
    cut = prm.shared_prefix_length(enc)
    assert cut <= min(int(e.label_positions[0]) for e in enc)
    text = tok.decode(enc[0].input_ids[:cut].tolist())
    assert "<|image_pad|>" in text and rec.question in text
    assert text.rstrip().endswith("### Solution Process:") or cands[0][0].startswith(cands[1][0][:1])
    # share_prefix=False goes through the whole-sequence path
    plain = prm.score_candidates(rec.images[0], rec.question, cands[:2], share_prefix=False)
    np.testing.assert_allclose(plain[1], unshared[1], atol=1e-6, rtol=0)


def test_text_only_candidates(prm, records):
    rec = records[2]
    cands = [_steps(r) for r in records[2:5]]
    shared = prm.score_candidates(None, rec.question, cands)
    unshared = prm.score_batch([(None, rec.question, c) for c in cands])
    for a, b in zip(shared, unshared):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_alone_equals_padded_batch(prm, records):
    items = [(r.images[0], r.question, _steps(r)) for r in records[:3]]
    batch = prm.score_batch(items)  # one chunk of 4 rows: 3 real of different lengths + a dummy row
    for item, b in zip(items, batch):
        alone = prm.score(*item)  # a batch of one
        np.testing.assert_allclose(b, alone, atol=1e-6, rtol=0)


def test_an_image_shared_by_items_is_preprocessed_once(prm, records, monkeypatch):
    r = records[0]
    items = [(r.images[0], r.question, _steps(r)[:k]) for k in (1, 2, 3)]
    expect = [prm.score(*it) for it in items]
    calls = []
    real = prm.image_processor.__call__
    monkeypatch.setattr(type(prm.image_processor), "__call__", lambda self, imgs, *a, **k: calls.append(1) or real(imgs, *a, **k))
    got = prm.score_batch(items)
    assert len(calls) == 1
    for g, e in zip(got, expect):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=0)


def test_max_length_drops_trailing_steps(prm, records):
    rec = next(r for r in records if len(r.steps) >= 4)
    full = prm.score(rec.images[0], rec.question, _steps(rec))
    enc = prm._encode(*prm._images(rec.images[0]), rec.question, _steps(rec))
    short = PRM(prm.model, prm.tokenizer, prm.image_processor, max_length=int(enc.label_positions[2]) + 4, **BUCKETS)
    got = short.score(rec.images[0], rec.question, _steps(rec))
    assert np.isnan(got[3:]).all() and not np.isnan(got[:3]).any()
    np.testing.assert_allclose(got[:3], full[:3], atol=1e-6, rtol=0)


def test_length_limit_never_sends_an_overlong_sequence(prm, records, monkeypatch):
    """Issue 12 item 4: a 50k-character step is dropped (NaN) as a later step, or refused with an error
    naming the item as the first; nothing longer than max_length (default: the largest length bucket)
    reaches the device."""
    assert prm.max_length == BUCKETS["length_buckets"][-1]
    rec = next(r for r in records if len(r.steps) >= 3)
    img, q, steps = rec.images[0], rec.question, _steps(rec)
    huge = "7 + 8 = 15. " * 4200  # ~50k characters
    sent = []
    real_full = prm.scorer._fns.full

    def spy(state, batch):
        sent.append(batch["input_ids"].shape[1])
        return real_full(state, batch)

    monkeypatch.setattr(prm.scorer._fns, "full", spy)
    ref = prm.score(img, q, steps[:2])
    got = prm.score(img, q, steps[:2] + [huge] + steps[2:])
    assert np.isnan(got[2:]).all() and len(got) == len(steps) + 1
    np.testing.assert_allclose(got[:2], ref, atol=1e-6, rtol=0)
    b = prm.score_batch([(img, q, steps), (img, q, [steps[0], huge])])
    assert np.isnan(b[1][1]) and not np.isnan(b[0]).any()
    with pytest.raises(ValueError, match=r"items\[1\]: too long to score.*max_length=768"):
        prm.score_batch([(img, q, steps), (img, q, [huge])])
    with pytest.raises(ValueError, match=r"candidates\[1\]: too long to score"):
        prm.score_candidates(img, q, [steps, [huge, steps[0]]])
    c = prm.score_candidates(img, q, [steps, steps[:1] + [huge]])
    assert np.isnan(c[1][1]) and not np.isnan(c[1][0])
    assert sent and max(sent) <= prm.max_length
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        PRM(prm.model, prm.tokenizer, max_length=0, **BUCKETS)


# ------------------------------------------------------------------------------------------------
# buckets: no recompilation after warm-up
# ------------------------------------------------------------------------------------------------
def test_no_recompilation_after_warmup(prm, records):
    s = prm.scorer
    assert s.trace_counts["full"] >= 2 and s.trace_counts["prefix"] >= 1 and s.trace_counts["suffix"] >= 2
    assert prm.warmup(text_only=False) == 0  # everything already compiled
    before, sizes = dict(s.trace_counts), s.cache_sizes()
    for n_cands, rec in zip((1, 3, 6), records):  # varied candidate counts and lengths
        cands = [_steps(r)[: 1 + (i % len(r.steps))] for i, r in enumerate(records[:n_cands])]
        out = prm.score_candidates(rec.images[0], rec.question, cands)
        assert len(out) == n_cands
    for n in (1, 3, 5):
        prm.score_batch([(r.images[0], r.question, _steps(r)[: 1 + i % 3]) for i, r in enumerate(records[:n])])
    assert s.trace_counts == before, (before, s.trace_counts)
    assert s.cache_sizes() == sizes
    # a new PRM on the same model graph reuses the compiled functions
    other = PRM(prm.model, prm.tokenizer, prm.image_processor, **BUCKETS)
    other.score(records[0].images[0], records[0].question, _steps(records[0]))
    assert s.trace_counts == before


# ------------------------------------------------------------------------------------------------
# loading: training workdir (Orbax) and export, linear head
# ------------------------------------------------------------------------------------------------
def test_load_from_workdir_and_export_linear_head(prm, tok, records, tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxprm import checkpointing as ck
    from jaxprm.models.prm import PRMModel, PRMSpec

    plus, minus = label_token_ids(tok)
    backbone = prm.model.backbone
    model = PRMModel(backbone, PRMSpec(plus_id=plus, minus_id=minus, head="linear"))
    rng = np.random.default_rng(0)
    model.step_head[...] = model.step_head[...] + jnp.asarray(rng.normal(0, 0.05, model.step_head.shape), jnp.float32)
    model.step_bias[...] = jnp.asarray([0.3, -0.2], jnp.float32)
    ip = prm.image_processor
    ref_prm = PRM(model, tok, ip, **BUCKETS)
    rec = records[0]
    item = (rec.images[0], rec.question, _steps(rec))
    ref = ref_prm.score(*item)
    assert not np.allclose(ref, prm.score(*item), atol=1e-3)  # the linear head is in play

    # training workdir: assets + an Orbax step with the "params" item
    wd = str(tmp_path / "workdir")
    ck.save_assets(os.path.join(wd, ck.ASSETS), spec=model.spec, model_config=backbone.config, tokenizer=tok,
                   image_processor=ip)
    mngr = ck.checkpoint_manager(wd, async_save=False, item_names=("params",))
    mngr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(ck.param_state(model))))
    mngr.wait_until_finished()
    mngr.close()
    loaded = jaxprm.load_prm(wd, **BUCKETS)
    assert loaded.spec.head == "linear"
    np.testing.assert_allclose(loaded.score(*item), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(jaxprm.load_prm(wd, step=7, **BUCKETS).score(*item), ref, atol=1e-6, rtol=0)

    # export (HF dir + prm.json + step_head.safetensors)
    ex = ck.export_hf(model, tok, ip, str(tmp_path / "export"))
    loaded2 = jaxprm.load_prm(ex, dtype="float32", **BUCKETS)
    np.testing.assert_allclose(loaded2.score(*item), ref, atol=1e-6, rtol=0)


def test_load_dtype_bfloat16(hf):
    import jax.numpy as jnp

    p = jaxprm.load_prm(hf[0], dtype="bfloat16")
    assert p.model.backbone.dtype == jnp.bfloat16
    assert p.model.backbone.language_model.embed_tokens[...].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        jaxprm.load_prm(hf[0], dtype="float8")


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_errors(prm, records, tmp_path):
    rec = records[0]
    img = rec.images[0]
    with pytest.raises(ValueError, match="steps must not be empty"):
        prm.score(img, rec.question, [])
    with pytest.raises(TypeError, match="question must be a string"):
        prm.score(img, 3, ["a"])
    with pytest.raises(TypeError, match="steps must be a list"):
        prm.score(img, rec.question, "one step as a string")
    with pytest.raises(TypeError, match=r"steps\[1\] must be a string"):
        prm.score(img, rec.question, ["a", 2])
    with pytest.raises(TypeError, match=r"items\[0\]"):
        prm.score_batch([(img, rec.question)])
    with pytest.raises(TypeError, match="items must be a list"):
        prm.score_batch("nope")
    with pytest.raises(TypeError, match="candidates must be a list"):
        prm.score_candidates(img, rec.question, "nope")
    with pytest.raises(ValueError, match=r"candidates\[1\]: steps must not be empty"):
        prm.score_candidates(img, rec.question, [["a"], []])
    with pytest.raises(TypeError, match="image must be"):
        prm.score(12345, rec.question, ["a"])
    assert prm.score_candidates(img, rec.question, []) == []
    assert prm.score_batch([]) == []
    with pytest.raises(FileNotFoundError, match="no such PRM directory"):
        jaxprm.load_prm(str(tmp_path / "missing"))
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        jaxprm.load_prm(str(f))
    with pytest.raises(FileNotFoundError, match="config.json"):
        jaxprm.load_prm(str(tmp_path))
    with pytest.raises(TypeError, match="path"):
        jaxprm.load_prm(None)
    with pytest.raises(ValueError, match="strictly increasing"):
        PRM(prm.model, prm.tokenizer, length_buckets=(512, 256))
    with pytest.raises(ValueError, match="multiples of 4"):
        PRM(prm.model, prm.tokenizer, patch_buckets=(66,))


# ------------------------------------------------------------------------------------------------
# benchmark smoke run (CPU, tiny)
# ------------------------------------------------------------------------------------------------
def test_host_bench_smoke(monkeypatch, capsys):
    import bench.host_bench as hb

    monkeypatch.setattr(hb, "candidates", lambda n, seed: [["a step.", "another step."]] * min(n, 2))
    res = hb.run("now", repeat=1)
    assert len(res["rows"]) == 6 and all(r["total_ms"] > 0 and r["prompt_ms"] > 0 for r in res["rows"])
    assert all(r["share_of_device_budget"] > 0 for r in res["rows"])


def test_bench_smoke(tmp_path):
    from bench.score_bench import main

    out = main(["--model", "tiny", "--batch", "2", "--seq", "128", "--image", "56", "--dtype", "float32",
                "--iters", "1", "--warmup", "0", "--steps", "4", "--shared-prefix", "40", "--hf",
                "--json", str(tmp_path / "r.json")])
    assert out["jax"]["forward"]["tokens_per_s"] > 0 and out["hf"]["tokens_per_s"] > 0
    assert out["jax"]["shared_prefix"]["candidates_per_s"] > 0 and out["speedup_forward"] > 0
    # same random weights? no (independent inits), but both are probabilities
    assert all(0 <= p <= 1 for p in out["jax"]["probs_sample"] + out["hf"]["probs_sample"])
    assert (tmp_path / "r.json").exists()
