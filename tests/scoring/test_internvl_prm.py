"""load_prm / PRM.score* on the InternVL backbone (issue 15 item 4): VisualPRM's prompt on a tiny random
InternVL, against transformers' ``InternVLForConditionalGeneration`` run from scratch on the prompt
built by hand from VisualPRM's layout; shared-prefix, batched and incremental scoring against
unbatched; both checkpoint layouts (native with a Qwen2 language model, remote-code with InternLM2);
the default prompt style, export round trip, best-of-N / guided search and ``python -m jaxprm.eval vpb``.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from jaxprm import checkpointing as ck
from jaxprm.data.prompt import VISUALPRM_SYSTEM_PROMPT
from jaxprm.data.tokenizer import build_internvl_tokenizer
from jaxprm.scoring import load_prm

from tests.models.internvl import hf_reference as R

TILE, TOKENS_PER_TILE = R.TILE, R.TOKENS_PER_TILE  # 56 px tiles, 4 tokens each
# tiles per row: an image of 1 tile, or a 2x1 grid + thumbnail (3), two images (4); prompts ~300-420 tokens
BUCKETS = dict(batch_size=4, batch_buckets=(1, 4), length_buckets=(512,), prefix_buckets=(512,),
               suffix_buckets=(64,), patch_buckets=(4,))
QUESTION = "How many red squares are in the picture?"
STEPS = ["I count the red squares: there are 3.", "Each square has 4 sides, so 3 x 4 = 12.",
         "The answer is 3."]
ATOL = 1e-5


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tok():
    corpus = [VISUALPRM_SYSTEM_PROMPT, QUESTION, *STEPS, "### Question:\n### Solution Process:\n + - "]
    return build_internvl_tokenizer(corpus * 3, vocab_size=640)


def _tiny(tok, text_type, seed):
    cfg = R.tiny_config(text_type)
    cfg.text_config.vocab_size = len(tok)
    cfg.image_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    return R.build_hf_model(cfg, seed=seed)


@pytest.fixture(scope="module")
def native(tok, tmp_path_factory):
    """(dir, torch model): transformers' native layout, Qwen2 language model; no prm.json, no
    preprocessor_config.json (InternVL's default tiling at the model's tile size)."""
    model = _tiny(tok, "qwen2", seed=0)
    d = str(tmp_path_factory.mktemp("internvl_native"))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def remote(tok, tmp_path_factory):
    """(dir, torch model): the remote-code layout VisualPRM-8B ships (InternLM2 language model: packed
    wqkv, ...), written from a Llama-shaped transformers model by the published mapping."""
    model = _tiny(tok, "llama", seed=1)
    d = str(tmp_path_factory.mktemp("internvl_remote"))
    R.save_remote_code(model, d, internlm2=True)
    tok.save_pretrained(d)  # the checkpoint's tokenizer (replaces the stand-in tokenizer_config.json)
    return d, model


@pytest.fixture(scope="module")
def prm(native):
    return load_prm(native[0], **BUCKETS)


def reference_probs(model, tok, images, question, steps):
    """P(+) from transformers, from scratch: VisualPRM's prompt written out by hand (InternVL's ChatML
    template, ``### Question:\\n<image>\\n{q}\\n\\n### Solution Process:\\n{step_1}``, one user turn per
    step, "+" in every assistant turn), ``<image>`` -> ``<img>`` + ``<IMG_CONTEXT>`` x 4/tile + ``</img>``
    with transformers' InternVL image processor, logits at the token before each "+" placeholder."""
    pv, image_text = None, ""
    if images:
        ip = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=12,  # InternVL's settings
                                      size={"height": TILE, "width": TILE}, image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225])
        out = ip(images, return_tensors="np")
        pv = out["pixel_values"]
        image_text = "".join("<img>" + "<IMG_CONTEXT>" * (int(n) * TOKENS_PER_TILE) + "</img>\n"
                             for n in out["num_patches"])
    turns = [f"### Question:\n{image_text}{question}\n\n### Solution Process:\n{steps[0]}", *steps[1:]]
    text, plus_chars = f"<|im_start|>system\n{VISUALPRM_SYSTEM_PROMPT}<|im_end|>\n", []
    for t in turns:
        text += f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n"
        plus_chars.append(len(text))
        text += "+<|im_end|>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [a for a, _ in enc["offset_mapping"]]
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    at = [starts.index(c) for c in plus_chars]
    assert all(enc["input_ids"][i] == plus for i in at)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values=None if pv is None else torch.tensor(pv)).logits[0].double()
    pair = logits[[i - 1 for i in at]][:, [plus, minus]]
    return torch.softmax(pair, -1)[:, 0].numpy()


def test_defaults_of_an_internvl_directory(prm, tok):
    assert prm.model.backbone_kind == "internvl" and prm.internvl
    assert prm.prompt_style.name == "visualprm" and prm.spec.prompt_style == "visualprm"
    assert (prm.spec.plus_id, prm.spec.minus_id) == (tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-"))
    assert prm.system_prompt == VISUALPRM_SYSTEM_PROMPT
    assert prm.image_processor.image_size == TILE and prm.image_processor.max_tiles == 12


@pytest.mark.parametrize("images", [[(112, 56, 1)], [(56, 56, 2)], []], ids=["3tiles", "1tile", "text"])
def test_score_matches_transformers(prm, native, tok, images):
    imgs = [_image(*a) for a in images]
    got = prm.score(imgs or None, QUESTION, STEPS)
    ref = reference_probs(native[1], tok, imgs, QUESTION, STEPS)
    err = float(np.abs(got - ref).max())
    assert err < ATOL, err
    assert got.dtype == np.float32 and got.shape == (3,)


def test_remote_code_internlm2_layout_matches_transformers(remote, tok):
    d, model = remote
    p = load_prm(d, **BUCKETS)
    assert p.model.backbone.config.llm_arch == "internlm2" and p.prompt_style.name == "visualprm"
    img = _image(112, 56, 3)
    err = float(np.abs(p.score(img, QUESTION, STEPS) - reference_probs(model, tok, [img], QUESTION, STEPS)).max())
    assert err < ATOL, err


def test_batched_and_shared_prefix_equal_unbatched(prm):
    a, b = _image(112, 56, 1), _image(56, 56, 2)
    items = [(a, QUESTION, STEPS), (None, "What is 2 + 2?", STEPS[:2]), ([b, b], QUESTION, STEPS[1:]),
             (b, QUESTION, STEPS[:1])]
    alone = [prm.score(*it) for it in items]
    for got, ref in zip(prm.score_batch(items), alone):
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    cands = [STEPS, STEPS[:2] + ["So the answer is 12."], ["There are 2 red squares.", "The answer is 2."]]
    enc = [prm._encode(*prm._images(a), QUESTION, c) for c in cands]
    assert prm.shared_prefix_length(enc) > enc[0].input_ids.tolist().index(prm.config.image_token_id)
    before = dict(prm.scorer.trace_counts)
    shared = prm.score_candidates(a, QUESTION, cands)
    assert prm.scorer.trace_counts.get("suffix", 0) >= before.get("suffix", 0) and "prefix" in prm.scorer.trace_counts
    unshared = prm.score_candidates(a, QUESTION, cands, share_prefix=False)
    for s, u, c in zip(shared, unshared, cands):
        np.testing.assert_allclose(s, u, atol=1e-5, rtol=0)
        np.testing.assert_allclose(u, prm.score(a, QUESTION, c), atol=1e-6, rtol=0)


def test_incremental_scorer_and_search(prm):
    from jaxprm.search import best_of_n, guided_greedy_search

    img = _image(112, 56, 1)
    inc = prm.incremental_scorer(img, QUESTION, check=True)
    first = inc.score_next([], STEPS[:1] + ["There are 2 red squares."])
    second = inc.score_next(STEPS[:1], [STEPS[1], "So the answer is 12."])
    assert inc.stats["appends"] == 1 and inc.stats["rebuilds"] == 0 and inc.stats.get("split_mismatch", 0) == 0
    ref = prm.score_candidates(img, QUESTION, [STEPS[:1], ["There are 2 red squares."], STEPS[:2],
                                               STEPS[:1] + ["So the answer is 12."]])
    for got, r in zip(first + second, ref):
        np.testing.assert_allclose(got, r, atol=1e-5, rtol=0)

    class Policy:  # the candidate next steps, in order
        def sample_next_steps(self, image, question, steps, k, **kw):
            return [STEPS[len(steps)], "The answer is \\boxed{7}."] if len(steps) < 2 else ["The answer is \\boxed{3}."]

    res = guided_greedy_search(prm, Policy(), img, QUESTION, k=2, max_steps=3)
    assert res.finished and len(res.steps) >= 1
    for t in res.trace:  # every candidate's scores equal scoring its prefix from scratch
        for cand, sc in zip(t["candidates"], t["scores"]):
            steps_so_far = res.steps[:t["step"]] + [cand]
            np.testing.assert_allclose(sc, prm.score(img, QUESTION, steps_so_far), atol=1e-5, rtol=0)
    bon = best_of_n(prm, img, QUESTION, ["\n\n".join(STEPS), "There are 2.\n\nThe answer is 2."], aggregate="min")
    assert bon.best_index in (0, 1)


def test_export_round_trip_and_overrides(prm, tmp_path):
    img = _image(112, 56, 1)
    out = ck.export_hf(prm.model, prm.tokenizer, prm.image_processor, str(tmp_path / "export"))
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_type"] == "internvl"
    assert json.loads((tmp_path / "export" / "prm.json").read_text())["prompt_style"] == "visualprm"
    again = load_prm(out, **BUCKETS)
    np.testing.assert_allclose(again.score(img, QUESTION, STEPS), prm.score(img, QUESTION, STEPS), atol=1e-6, rtol=0)
    other = load_prm(out, prompt_style="vlprm", **BUCKETS)  # an explicit style wins over prm.json
    assert other.prompt_style.name == "vlprm"
    assert not np.allclose(other.score(img, QUESTION, STEPS), prm.score(img, QUESTION, STEPS), atol=1e-4)


def test_control_tokens_and_mismatched_tokenizer(prm, native, tmp_path):
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        prm.score(None, QUESTION, ["see <IMG_CONTEXT> here"])
    from jaxprm.data.synthetic import build_synthetic_tokenizer
    from jaxprm.scoring import PRM

    with pytest.raises(ValueError, match="IMG_CONTEXT"):  # a tokenizer without InternVL's tokens
        PRM(prm.model, build_synthetic_tokenizer(), **BUCKETS)


def test_eval_vpb_cli(native, tmp_path):
    from jaxprm.eval.run import main

    _image(112, 56, 1).save(tmp_path / "x.png")
    rows = [{"image": ["x.png"], "question": QUESTION, "answer": "3", "data_source": "MMMU",
             "response": {"steps": STEPS, "process_correctness": [1, -1, 1]}},
            {"image": ["x.png"], "question": "What is 2 + 2?", "answer": "4", "data_source": "WeMath",
             "response": {"steps": STEPS[:2], "process_correctness": [1, 1]}}]
    data = tmp_path / "vpb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["vpb", "--prm", native[0], "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    scores = [json.loads(x) for x in (tmp_path / "out" / "vpb_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2 and len(scores[0]["pred_scores"]) == 3
