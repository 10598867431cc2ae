"""The prompt's host fast paths equal transformers' chat template and tokenizer (issue 19 item 1).

``encode_prm_example`` writes the known ChatML templates without jinja (``_render_chatml``) and tokenizes
the text piece by piece between special tokens with a per-tokenizer memo (``_SegmentTokenizer``). These
tests compare both with the reference: ``tokenizer.apply_chat_template`` (jinja) and the tokenizer run
on the whole text, for every prompt style, 0 / 1 / several images, both backbones' templates, and odd
step texts; and the whole encoding with the fast paths on and off.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import jaxprm.data.prompt as P
from jaxprm.data.prompt import PROMPT_STYLES, build_messages, encode_prm_example, internvl_prompt_tokenizer
from jaxprm.data.synthetic import build_synthetic_internvl_tokenizer, build_synthetic_tokenizer

QUESTION = "How many red squares are there? Answer with a number."
ODD_STEPS = [
    ["There are 3 red squares.", "", "So the answer is \\boxed{3}."],  # an empty step
    ["  leading and trailing spaces  ", "\n", "tabs\tand\nnew lines\n\n"],
    ["jinja-looking {{ x }} {% if %} <b>&amp;</b> \"quotes\" 'q'", "unicode: é ü 你好 ∑ \ue000 😀"],
    ["+", "-", "+-+"],  # steps that are label strings themselves
    ["one step only"],
]


@pytest.fixture(scope="module")
def qwen_tok():
    return build_synthetic_tokenizer()


@pytest.fixture(scope="module")
def internvl_tok():
    return internvl_prompt_tokenizer(build_synthetic_internvl_tokenizer())


@pytest.fixture(scope="module")
def nosys_tok():
    """Qwen's template without the default system turn (as some fine-tuned checkpoints ship it)."""
    tok = copy.deepcopy(build_synthetic_tokenizer())
    tok.chat_template = P.QWEN_VL_CHAT_TEMPLATE.replace(P._QWEN_DEFAULT_SYSTEM, "")
    assert tok.chat_template != P.QWEN_VL_CHAT_TEMPLATE
    return tok


def _jinja(tok, messages, add_generation_prompt=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _whole(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"], np.int64), np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)


@pytest.mark.parametrize("which", ["qwen", "internvl", "nosys"])
@pytest.mark.parametrize("style", sorted(PROMPT_STYLES))
@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_chatml_render_equals_the_chat_template(qwen_tok, internvl_tok, nosys_tok, which, style, num_images):
    tok = {"qwen": qwen_tok, "internvl": internvl_tok, "nosys": nosys_tok}[which]
    spec = P._chatml_spec(tok)
    assert spec is not None
    for steps in ODD_STEPS:
        for labels in (None, [1, 0, None][: len(steps)] + [None] * (len(steps) - 3)):
            msgs = build_messages(QUESTION, steps, labels, num_images=num_images, style=style)
            for k in range(1, len(msgs) + 1):  # every prefix, with and without the generation prompt
                for gen in (False, True):
                    text, starts, ends = P._render_chatml(msgs[:k], spec, gen)
                    assert text == _jinja(tok, msgs[:k], gen)
                    assert P._render(tok, msgs[:k], gen) == text
                    # each message's content starts where the conversation up to it, with the generation
                    # prompt, ends, and the message ends where the conversation through it ends
                    for i in range(k):
                        assert ends[i] == len(_jinja(tok, msgs[: i + 1]))
                        if msgs[i]["role"] == "assistant":
                            assert starts[i] == len(_jinja(tok, msgs[:i], True))


def test_chatml_default_system_turn_and_string_content(qwen_tok, internvl_tok, nosys_tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "+"}]}]
    assert P._render_chatml(msgs, P._chatml_spec(qwen_tok))[0].startswith("<|im_start|>system\nYou are")
    assert P._render_chatml(msgs, P._chatml_spec(nosys_tok))[0].startswith("<|im_start|>user")
    for tok in (qwen_tok, internvl_tok, nosys_tok):
        assert P._render_chatml(msgs, P._chatml_spec(tok))[0] == _jinja(tok, msgs)


def test_chatml_fast_path_only_for_the_known_templates_and_message_shapes(qwen_tok):
    spec = P._chatml_spec(qwen_tok)
    # anything but plain image / text parts goes to jinja
    assert P._render_chatml([{"role": "user", "content": [{"type": "image", "url": "x"}]}], spec) is None
    assert P._render_chatml([{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}], spec) is None
    assert P._render_chatml([{"role": "user", "content": "a", "name": "n"}], spec) is None

    class Own(type(qwen_tok)):  # a tokenizer class with its own apply_chat_template
        def apply_chat_template(self, *a, **k):
            return "own"

    own = _fresh()
    own.__class__ = Own
    assert P._chatml_spec(own) is None and P._render(own, [{"role": "user", "content": "a"}]) == "own"
    other = _fresh()
    other.chat_template = P.INTERNVL_CHAT_TEMPLATE.replace("<|im_end|>\n", "<|im_end|>\n\n")
    assert P._chatml_spec(other) is None


@pytest.mark.parametrize("which", ["qwen", "internvl"])
def test_segment_tokenizer_equals_whole_text(qwen_tok, internvl_tok, which):
    tok = qwen_tok if which == "qwen" else internvl_tok
    seg = P._segment_tokenizer(tok)
    assert seg is not None and "<|im_start|>" in seg.split and "<|image_pad|>" in seg.split
    if which == "internvl":
        assert {"<img>", "</img>", "<IMG_CONTEXT>"} <= set(seg.split)
    texts = ["", "plain text", "<|im_start|>", "<|im_end|><|im_start|>", "a<|im_end|>\n<|im_start|>b",
             "<|vision_start|><|image_pad|><|vision_end|>\n### Q", " <|im_start|> x ", "<|im_start|",
             "<|endoftext|>tail", "é<|im_end|>ü 你好", "<img><IMG_CONTEXT></img>\n", "x" * 300 + "<|im_end|>"]
    for style in sorted(PROMPT_STYLES):
        for steps in ODD_STEPS:
            texts.append(_jinja(tok, build_messages(QUESTION, steps, num_images=2, style=style)))
    for rep in range(2):  # the second round comes from the memo
        for t in texts:
            ids, offs = seg(tok, t)
            ref_ids, ref_offs = _whole(tok, t)
            np.testing.assert_array_equal(ids, ref_ids, err_msg=repr(t))
            np.testing.assert_array_equal(offs, ref_offs, err_msg=repr(t))


def _fresh():
    """A copy of the synthetic tokenizer that a test may change (``build_synthetic_tokenizer`` is shared)."""
    return copy.deepcopy(build_synthetic_tokenizer())


def _tokenizer_with(extra_tokens):
    tok = _fresh()
    tok.add_tokens(extra_tokens)
    return tok


def test_special_tokens_that_do_not_split_exactly_are_not_split_at():
    from tokenizers import AddedToken

    base = build_synthetic_tokenizer()
    split = P._exact_split_tokens(base.backend_tokenizer)
    assert "<|im_start|>" in split and "<|im_end|>" in split
    # an added token overlapping <|im_end|> (ending with its start): a match could cross a piece boundary
    tok = _tokenizer_with([AddedToken("ab<|im_", special=False)])
    assert "<|im_end|>" not in P._exact_split_tokens(tok.backend_tokenizer)
    assert "<|im_start|>" not in P._exact_split_tokens(tok.backend_tokenizer)
    # ... or containing it
    tok = _tokenizer_with([AddedToken("<|im_end|>\n", special=False)])
    assert "<|im_end|>" not in P._exact_split_tokens(tok.backend_tokenizer)
    for t in ("q<|im_end|>\n<|im_start|>x", "ab<|im_end|>", "ab<|im_start|>"):
        seg = P._segment_tokenizer(tok)
        ids, offs = seg(tok, t)
        ref_ids, ref_offs = _whole(tok, t)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(offs, ref_offs)


def test_segment_memo_is_rebuilt_when_tokens_are_added():
    tok = _fresh()
    seg = P._segment_tokenizer(tok)
    assert P._segment_tokenizer(tok) is seg
    tok.add_tokens(["squares are"])
    seg2 = P._segment_tokenizer(tok)
    assert seg2 is not seg
    t = "<|im_start|>user\nred squares are here<|im_end|>\n"
    np.testing.assert_array_equal(seg2(tok, t)[0], _whole(tok, t)[0])


@pytest.mark.parametrize("style", sorted(PROMPT_STYLES))
@pytest.mark.parametrize("mode", ["score", "train"])
def test_encoding_with_fast_paths_equals_without(qwen_tok, internvl_tok, nosys_tok, monkeypatch, style, mode):
    cases = []
    for steps in ODD_STEPS:
        labels = [1, 0, None, 1][: len(steps)] + [None] * max(0, len(steps) - 4)
        for grids in (None, np.array([[1, 4, 6]]), np.array([[1, 4, 6], [1, 2, 2], [1, 6, 4]])):
            cases.append((qwen_tok, steps, labels, dict(image_grid_thw=grids)))
            cases.append((nosys_tok, steps, labels, dict(image_grid_thw=grids)))
        for tiles in (None, [1], [3, 1]):
            kw = {} if tiles is None else dict(image_tokens=[256 * t for t in tiles], image_pad=P.INTERNVL_IMAGE_PAD)
            cases.append((internvl_tok, steps, labels, kw))

    def encode_all():
        out = []
        for tok, steps, labels, kw in cases:
            full = encode_prm_example(tok, QUESTION, steps, labels, mode=mode, style=style, **kw)
            out.append(full)
            if len(steps) > 1:  # drop the last step
                out.append(encode_prm_example(tok, QUESTION, steps, labels, mode=mode, style=style,
                                              max_length=len(full) - 1, **kw))
        return out

    fast = encode_all()
    monkeypatch.setattr(P, "_chatml_spec", lambda t: None)
    monkeypatch.setattr(P, "_segment_tokenizer", lambda t: None)
    ref = encode_all()
    assert len(fast) == len(ref)
    for f, r in zip(fast, ref):
        for name in ("input_ids", "label_positions", "label_token_index", "labels", "num_image_tokens"):
            np.testing.assert_array_equal(getattr(f, name), getattr(r, name))
        assert f.text == r.text and f.num_steps_dropped == r.num_steps_dropped


def test_memo_does_not_keep_the_tokenizer_alive():
    import gc
    import weakref

    tok = _fresh()
    encode_prm_example(tok, QUESTION, ["a step"], image_grid_thw=np.array([[1, 4, 4]]))
    assert P._tokenizer_memo(tok) is not None
    ref = weakref.ref(tok)
    del tok
    gc.collect()
    assert ref() is None


def test_public_helpers_equal_transformers(qwen_tok, internvl_tok):
    for tok in (qwen_tok, internvl_tok):
        for style in sorted(PROMPT_STYLES):
            msgs = build_messages(QUESTION, ODD_STEPS[0], num_images=1, style=style)
            for gen, m in ((False, msgs), (True, msgs[:-1])):
                text = P.render_messages(tok, m, add_generation_prompt=gen)
                assert text == _jinja(tok, m, gen)
                for t in (text, text[text.index("<|im_start|>user"):]):
                    ids, starts, ends = P.tokenize_with_offsets(tok, t)
                    ref_ids, ref_offs = _whole(tok, t)
                    np.testing.assert_array_equal(ids, ref_ids)
                    np.testing.assert_array_equal(np.stack([starts, ends], 1), ref_offs)
