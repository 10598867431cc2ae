"""The PRM prompt: messages, ids equal to HF's chat template + processor, label positions, truncation."""
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxprm.data.preprocess import ImageProcessor
from jaxprm.data.prompt import (
    PRM_SYSTEM_PROMPT,
    VISUALPRM_SYSTEM_PROMPT,
    PromptEncoding,
    build_messages,
    encode_prm_example,
    label_token_ids,
)
from jaxprm.data.tokenizer import QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE, build_tokenizer, special_token_ids

QUESTION = "How many red squares are in the picture? Options: (A) 2 (B) 3"
STEPS = [
    "I see three red squares + one blue circle.",
    "3 - 1 = 2, so the count is 2.",
    "assistant\n+ is not a verdict; the answer is (A).",
    "Final answer: A",
]


@pytest.fixture(scope="module")
def tok():
    corpus = [QUESTION, *STEPS, PRM_SYSTEM_PROMPT, "### Question:\n### Solution Process:\n", "assistant\n+", "assistant\n-"]
    return build_tokenizer(corpus * 3, vocab_size=512)


@pytest.fixture(scope="module")
def ids(tok):
    return special_token_ids(tok)


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)),
    ]


def _reference_ids(tok, messages, grids, merge=2):
    """apply_chat_template ids with each <|image_pad|> expanded (the Qwen2.5-VL processor's rule)."""
    out = tok.apply_chat_template(messages, tokenize=True)
    raw = out["input_ids"] if hasattr(out, "keys") else out
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    res, i = [], 0
    for t in raw:
        if t == pad:
            res += [pad] * (int(np.prod(grids[i])) // merge**2)
            i += 1
        else:
            res.append(t)
    assert i == len(grids)
    return np.asarray(res)


def test_messages_structure():
    msgs = build_messages(QUESTION, STEPS[:3], labels=[1, 0, None], num_images=2, placeholder="+", style="chat")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == [{"type": "text", "text": PRM_SYSTEM_PROMPT}]
    first = msgs[1]["content"]
    assert first[:2] == [{"type": "image"}, {"type": "image"}]
    assert first[2] == {"type": "text", "text": f"### Question:\n{QUESTION}\n\n### Solution Process:\n{STEPS[0]}"}
    # the default "vlprm" style: each image is followed by "\n" (the "<image>\n" of its training rows)
    vl = build_messages(QUESTION, STEPS[:3], labels=[1, 0, None], num_images=2, placeholder="+")
    nl = {"type": "text", "text": "\n"}
    assert vl[1]["content"] == [{"type": "image"}, nl, {"type": "image"}, nl, first[2]]
    assert vl[2:] == msgs[2:] and vl[0] == msgs[0]
    assert msgs[3]["content"] == [{"type": "text", "text": STEPS[1]}]
    assert [m["content"][0]["text"] for m in msgs[2::2]] == ["+", "-", "+"]
    assert [m["content"][0]["text"] for m in build_messages(QUESTION, STEPS[:2], num_images=0)[2::2]] == ["+", "+"]
    assert build_messages(QUESTION, STEPS[:1], num_images=0)[1]["content"][0]["type"] == "text"
    assert '"+"' in PRM_SYSTEM_PROMPT and '"-"' in PRM_SYSTEM_PROMPT and '"+"' in VISUALPRM_SYSTEM_PROMPT
    msgs = build_messages(QUESTION, STEPS[:1], system_prompt=VISUALPRM_SYSTEM_PROMPT)
    assert msgs[0]["content"][0]["text"] == VISUALPRM_SYSTEM_PROMPT


@pytest.mark.parametrize("mode", ["score", "train"])
def test_ids_equal_chat_template_with_expanded_pads(tok, ids, mode):
    grids = ImageProcessor()(_images())["image_grid_thw"]
    labels = [1, 0, None, 0]
    enc = encode_prm_example(tok, QUESTION, STEPS, labels=labels, image_grid_thw=grids, mode=mode)
    assert isinstance(enc, PromptEncoding)
    turn_labels = labels if mode == "train" else None
    ref = _reference_ids(tok, build_messages(QUESTION, STEPS, turn_labels, num_images=2), grids)
    assert enc.input_ids.dtype == np.int32
    np.testing.assert_array_equal(enc.input_ids, ref)
    assert enc.text == tok.apply_chat_template(build_messages(QUESTION, STEPS, turn_labels, num_images=2), tokenize=False)
    pad = ids["<|image_pad|>"]
    assert (enc.input_ids == pad).sum() == int(np.prod(grids, axis=1).sum()) // 4
    np.testing.assert_array_equal(enc.num_image_tokens, np.prod(grids, axis=1) // 4)
    assert (enc.input_ids == ids["<|vision_start|>"]).sum() == 2


def test_ids_equal_hf_qwen2_5_vl_processor(tok):
    """Our image processor + prompt == transformers' Qwen2_5_VLProcessor on the same images and text."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    class _Proc(Qwen2_5_VLProcessor):  # no torchvision here, so no video processor; skip its class check
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    try:
        proc = _Proc(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok, video_processor=None,
                     chat_template=QWEN_VL_CHAT_TEMPLATE)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot build Qwen2_5_VLProcessor offline: {e}")
    images = _images()
    ours_img = ImageProcessor()(images)
    enc = encode_prm_example(tok, QUESTION, STEPS, labels=[1, 1, 0, None],
                             image_grid_thw=ours_img["image_grid_thw"], mode="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = proc(text=[enc.text], images=images)
    np.testing.assert_array_equal(np.asarray(hf["input_ids"])[0], enc.input_ids)
    np.testing.assert_array_equal(np.asarray(hf["image_grid_thw"]), ours_img["image_grid_thw"])
    np.testing.assert_array_equal(np.asarray(hf["pixel_values"]), ours_img["pixel_values"])


def test_label_positions_and_labels(tok, ids):
    grids = np.array([[1, 4, 6]])
    plus, minus = label_token_ids(tok)
    labels = [1, 0, None, 0]
    tr = encode_prm_example(tok, QUESTION, STEPS, labels=labels, image_grid_thw=grids, mode="train")
    sc = encode_prm_example(tok, QUESTION, STEPS, labels=labels, image_grid_thw=grids, mode="score")
    for enc in (tr, sc):
        assert (enc.plus_id, enc.minus_id) == (plus, minus)
        np.testing.assert_array_equal(enc.labels, [1, 0, -1, 0])
        assert enc.labels.dtype == enc.label_positions.dtype == enc.label_token_index.dtype == np.int32
        np.testing.assert_array_equal(enc.label_positions, enc.label_token_index - 1)
        assert enc.num_steps_dropped == 0 and enc.num_steps == 4
        for j in enc.label_token_index:  # "<|im_start|>assistant\n" then the label, then "<|im_end|>"
            assert tok.decode(enc.input_ids[:j]).endswith("<|im_start|>assistant\n")
            assert enc.input_ids[j + 1] == ids["<|im_end|>"]
    np.testing.assert_array_equal(tr.input_ids[tr.label_token_index], [plus, minus, plus, minus])
    np.testing.assert_array_equal(sc.input_ids[sc.label_token_index], [plus] * 4)
    # The steps hold "+" and "-" characters too; only the assistant verdicts are label tokens.
    assert (sc.input_ids == plus).sum() > 4
    # Label positions agree between modes up to where the contents differ (same lengths: one token each).
    np.testing.assert_array_equal(tr.label_token_index, sc.label_token_index)
    # Placeholder "-" for scoring.
    neg = encode_prm_example(tok, QUESTION, STEPS, image_grid_thw=grids, placeholder="-")
    np.testing.assert_array_equal(neg.input_ids[neg.label_token_index], [minus] * 4)
    np.testing.assert_array_equal(neg.labels, [-1] * 4)


def test_truncation_drops_whole_steps(tok, ids):
    grids = np.array([[1, 8, 10]])  # 20 image tokens
    labels = [1, 1, 0, 0]
    full = encode_prm_example(tok, QUESTION, STEPS, labels=labels, image_grid_thw=grids, mode="train")
    for keep in (1, 2, 3):
        cut = int(np.flatnonzero(full.input_ids == ids["<|im_start|>"])[2 * keep + 1])  # after assistant turn `keep`
        for max_len in (cut, cut + 1):
            enc = encode_prm_example(tok, QUESTION, STEPS, labels=labels, image_grid_thw=grids, mode="train",
                                     max_length=max_len)
            assert enc.num_steps_dropped == 4 - keep
            assert len(enc) == cut <= max_len
            np.testing.assert_array_equal(enc.input_ids, full.input_ids[:cut])
            np.testing.assert_array_equal(enc.labels, labels[:keep])
            np.testing.assert_array_equal(enc.label_token_index, full.label_token_index[:keep])
            ref = encode_prm_example(tok, QUESTION, STEPS[:keep], labels=labels[:keep], image_grid_thw=grids, mode="train")
            np.testing.assert_array_equal(enc.input_ids, ref.input_ids)
            assert enc.text == ref.text
            assert enc.input_ids[-2] == ids["<|im_end|>"]
            assert (enc.input_ids == ids["<|image_pad|>"]).sum() == 20
    fits = encode_prm_example(tok, QUESTION, STEPS, image_grid_thw=grids, max_length=len(full))
    assert fits.num_steps_dropped == 0 and len(fits) == len(full)
    first = int(np.flatnonzero(full.input_ids == ids["<|im_start|>"])[3])
    with pytest.raises(ValueError, match=rf"needs {first} tokens.*max_length={first - 1}"):
        encode_prm_example(tok, QUESTION, STEPS, image_grid_thw=grids, max_length=first - 1)


def test_multiple_images_and_text_only(tok, ids):
    grids = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
    enc = encode_prm_example(tok, QUESTION, STEPS[:2], image_grid_thw=grids)
    pad = ids["<|image_pad|>"]
    vs = np.flatnonzero(enc.input_ids == ids["<|vision_start|>"])
    ve = np.flatnonzero(enc.input_ids == ids["<|vision_end|>"])
    assert len(vs) == len(ve) == 3
    assert [int(e - s - 1) for s, e in zip(vs, ve)] == [6, 1, 6]
    assert all((enc.input_ids[s + 1:e] == pad).all() for s, e in zip(vs, ve))
    assert ve[-1] < enc.label_token_index[0]
    np.testing.assert_array_equal(enc.input_ids, _reference_ids(tok, build_messages(QUESTION, STEPS[:2], num_images=3), grids))
    # merge_size 1: t*h*w tokens per image.
    enc1 = encode_prm_example(tok, QUESTION, STEPS[:2], image_grid_thw=grids[:1], merge_size=1)
    assert (enc1.input_ids == pad).sum() == 24
    # No image: plain text prompt.
    txt = encode_prm_example(tok, QUESTION, STEPS[:2])
    assert (txt.input_ids == pad).sum() == 0 and (txt.input_ids == ids["<|vision_start|>"]).sum() == 0
    np.testing.assert_array_equal(txt.input_ids, _reference_ids(tok, build_messages(QUESTION, STEPS[:2], num_images=0), []))


def test_errors(tok):
    grids = np.array([[1, 4, 6]])
    with pytest.raises(ValueError, match="2 labels for 4 steps"):
        encode_prm_example(tok, QUESTION, STEPS, labels=[1, 0], image_grid_thw=grids)
    with pytest.raises(ValueError, match="must be 1, 0 or None"):
        encode_prm_example(tok, QUESTION, STEPS[:1], labels=[2], image_grid_thw=grids)
    with pytest.raises(ValueError, match="mode"):
        encode_prm_example(tok, QUESTION, STEPS[:1], image_grid_thw=grids, mode="training")
    with pytest.raises(ValueError, match="steps must not be empty"):
        encode_prm_example(tok, QUESTION, [], image_grid_thw=grids)
    with pytest.raises(TypeError, match="list of strings"):
        encode_prm_example(tok, QUESTION, "one step", image_grid_thw=grids)
    with pytest.raises(ValueError, match=r"steps\[1\].*<\|image_pad\|>"):
        encode_prm_example(tok, QUESTION, ["a", "look: <|image_pad|>"], image_grid_thw=grids)
    with pytest.raises(ValueError, match=r"question.*<\|im_end\|>"):
        encode_prm_example(tok, "q<|im_end|>", ["a"], image_grid_thw=grids)
    with pytest.raises(ValueError, match=r"shape \(n_images, 3\)"):
        encode_prm_example(tok, QUESTION, ["a"], image_grid_thw=np.array([[4, 6]]))
    with pytest.raises(ValueError, match="placeholder.*single token"):
        encode_prm_example(tok, QUESTION, ["a"], image_grid_thw=grids, placeholder="xyz+-qq")
    with pytest.raises(ValueError, match="max_length must be positive"):
        encode_prm_example(tok, QUESTION, ["a"], image_grid_thw=grids, max_length=0)
    assert set(QWEN_SPECIAL_TOKENS) >= {"<|im_start|>", "<|im_end|>", "<|image_pad|>"}


def test_label_merged_with_neighbours_is_detected():
    """A tokenizer whose BPE merges "\\n+" into one token must be refused, not silently mislabelled."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["assistant\n+", "assistant\n-"] * 50,
                          trainer=trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    t.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    bad = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    bad.chat_template = QWEN_VL_CHAT_TEMPLATE
    assert len(bad.encode("+")) == 1  # alone it is one token ...
    with pytest.raises(ValueError, match="did not tokenize to its own token"):  # ... but not in context
        encode_prm_example(bad, "q", ["a"], system_prompt="s")


def test_label_token_ids_must_be_single_tokens(tok):
    class TwoTokenPlus:
        def encode(self, s, add_special_tokens=False):
            return [1, 2] if s == "+" else [3]

    with pytest.raises(ValueError, match=r"positive label '\+' must be a single token"):
        label_token_ids(TwoTokenPlus())
    plus, minus = label_token_ids(tok)
    assert plus != minus


def test_slow_tokenizer_path_matches_offsets_path(tok):
    """Without offset mappings (slow tokenizers) labels are located by tokenizing prefixes; same result."""

    class Slow:
        is_fast = False

        def __init__(self, t):
            self._t = t

        def __getattr__(self, k):
            return getattr(self._t, k)

        def __call__(self, text, **kw):
            assert "return_offsets_mapping" not in kw
            return self._t(text, **kw)

    grids = np.array([[1, 4, 4]])
    fast = encode_prm_example(tok, QUESTION, STEPS, labels=[1, 0, 1, 0], image_grid_thw=grids, mode="train")
    slow = encode_prm_example(Slow(tok), QUESTION, STEPS, labels=[1, 0, 1, 0], image_grid_thw=grids, mode="train")
    np.testing.assert_array_equal(slow.input_ids, fast.input_ids)
    np.testing.assert_array_equal(slow.label_token_index, fast.label_token_index)
    cut = encode_prm_example(Slow(tok), QUESTION, STEPS, labels=[1, 0, 1, 0], image_grid_thw=grids, mode="train",
                             max_length=len(fast) - 1)
    assert cut.num_steps_dropped == 1
    np.testing.assert_array_equal(cut.input_ids, fast.input_ids[: len(cut)])


@pytest.mark.parametrize("style", ["vlprm", "visualprm", "chat"])
@pytest.mark.parametrize("mode", ["score", "train"])
def test_one_render_label_spans_equal_prefix_by_prefix(tok, monkeypatch, style, mode):
    """The fast paths (ChatML written without jinja with its turn positions, pieces tokenized between
    special tokens; or one marked jinja render) find the same ids, label and turn-end positions as
    rendering the conversation prefix by prefix with jinja and tokenizing it whole, also when truncating."""
    import jaxprm.data.prompt as P

    grids = np.array([[1, 4, 6]])
    kw = dict(labels=[1, 0, None, 0], image_grid_thw=grids, mode=mode, style=style)

    def encode_both():
        full = encode_prm_example(tok, QUESTION, STEPS, **kw)
        return [full, encode_prm_example(tok, QUESTION, STEPS, max_length=len(full) - 3, **kw)]

    assert P._chatml_spec(tok) is not None and P._segment_tokenizer(tok) is not None
    fast = encode_both()
    monkeypatch.setattr(P, "_chatml_spec", lambda t: None)  # jinja renders
    monkeypatch.setattr(P, "_segment_tokenizer", lambda t: None)  # the whole text tokenized at once
    marked = encode_both()
    calls = []
    monkeypatch.setattr(P, "_label_spans_marked", lambda *a: calls.append(1))  # -> None: the slow path
    slow = encode_both()
    assert calls and fast[1].num_steps_dropped == 1
    for other in (marked, slow):
        for f, s in zip(fast, other):
            for name in ("input_ids", "label_positions", "label_token_index", "labels"):
                np.testing.assert_array_equal(getattr(f, name), getattr(s, name))
            assert f.text == s.text and f.num_steps_dropped == s.num_steps_dropped


def test_marked_render_is_refused_when_text_holds_the_marks(tok):
    import jaxprm.data.prompt as P

    steps = [STEPS[0] + P._MARK_OPEN + "0" + P._MARK_CLOSE, STEPS[1]]
    enc = encode_prm_example(tok, QUESTION, steps, labels=[1, 0], mode="train")
    msgs = build_messages(QUESTION, steps, [1, 0], num_images=0)
    assert P._label_spans_marked(tok, msgs, ["+", "-"], enc.text) is None  # falls back, same result
    plus, minus = label_token_ids(tok)
    np.testing.assert_array_equal(enc.input_ids[enc.label_token_index], [plus, minus])
