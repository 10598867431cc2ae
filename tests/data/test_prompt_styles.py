"""Prompt styles (issue 13): each family's prompt, token by token, against its authors' own layout.

The references below are written from the authors' code as described in ``jaxprm.data.prompt``'s
docstring, not from our encoder:

* VL-PRM trains with ``preprocess_qwen_2_visual`` (vlprm ``train/qwen_trainer/qwenvl/data/data_qwen.py``):
  each turn rendered alone as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and tokenized, the ids
  concatenated; ``<image>`` in the user text replaced in place by ``<|vision_start|>`` + one
  ``<|image_pad|>`` per merged patch + ``<|vision_end|>``; the supervised token of an assistant turn is
  its 4th token (the first 3, ``<|im_start|>assistant\\n``, and the last 2, ``<|im_end|>\\n``, are masked).
* VisualPRM scores with InternVL's ChatML conversation (``generate_steps_with_soft_score_v2``):
  ``"<image>\\n"`` prepended to the question, so the first user turn is
  ``"### Question:\\n<image>\\n{question}\\n\\n### Solution Process:\\n{step_1}"``; every assistant turn holds
  the ``"+"`` placeholder; the whole string tokenized at once, ``<image>`` replaced by the backbone's
  image tokens.
"""
import json

import numpy as np
import pytest

from jaxprm.data.prompt import (
    PRM_SYSTEM_PROMPT,
    PROMPT_STYLES,
    VISUALPRM_SYSTEM_PROMPT,
    build_messages,
    encode_prm_example,
    get_prompt_style,
    label_token_ids,
)
from jaxprm.data.solution import mark_up_steps
from jaxprm.data.tokenizer import build_tokenizer
from jaxprm.models.prm import PRMSpec

QUESTION = "How many red squares are there?"
PLAIN = ["There are two red squares.", "One blue circle.", "2 + 0 = 2, so the answer is 2."]
KINDS = ["perception", "perception", "reasoning"]
# the released VL-PRM300K-train turns, written out by hand (not by mark_up_steps)
MARKED = [
    "[Visual Elements]\n<step_1>\nThere are two red squares.\n</step_1>",
    "<step_2>\nOne blue circle.\n</step_2>",
    "[Reasoning]\n<step_1>\n2 + 0 = 2, so the answer is 2.\n</step_1>",
]
GRIDS = np.array([[1, 4, 6], [1, 2, 4]])  # two images: 6 and 2 merged tokens (merge 2)


@pytest.fixture(scope="module")
def tok():
    corpus = [QUESTION, *MARKED, PRM_SYSTEM_PROMPT, VISUALPRM_SYSTEM_PROMPT,
              "### Question:\n### Solution Process:\n", "assistant\n+", "assistant\n-"]
    return build_tokenizer(corpus * 3, vocab_size=600)


def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _vision(n):
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


def test_mark_up_steps_is_the_published_turn_text():
    assert mark_up_steps(PLAIN, KINDS) == MARKED
    assert mark_up_steps(MARKED, KINDS) == MARKED  # already marked: kept
    # a raw step whose text still opens with its header (VL-PRM300K raw, issue 13 defect 7)
    assert mark_up_steps(["a", "[Reasoning]\nb"], ["perception", "perception"]) == [
        "[Visual Elements]\n<step_1>\na\n</step_1>", "[Reasoning]\n<step_1>\nb\n</step_1>"]
    with pytest.raises(ValueError, match="kinds"):
        mark_up_steps(PLAIN, KINDS[:2])
    with pytest.raises(ValueError, match="kind must be"):
        mark_up_steps(["a"], ["other"])


@pytest.mark.parametrize("n_images", [1, 2])
def test_vlprm_style_equals_vlprm_training_ids(tok, n_images):
    """Train mode (true labels in the assistant turns) vs the released training code's token ids and
    supervised positions."""
    labels = [1, 1, 0]
    grids = GRIDS[:n_images]
    n_tok = [int(np.prod(g)) // 4 for g in grids]
    enc = encode_prm_example(tok, QUESTION, MARKED, labels, image_grid_thw=grids, mode="train", style="vlprm")

    first = "<image>\n" * n_images + f"### Question:\n{QUESTION}\n\n### Solution Process:\n{MARKED[0]}"
    for n in n_tok:
        first = first.replace("<image>", _vision(n), 1)
    ref, supervised = _ids(tok, f"<|im_start|>system\n{PRM_SYSTEM_PROMPT}<|im_end|>\n"), []
    for k, (step, lab) in enumerate(zip(MARKED, labels)):
        ref += _ids(tok, f"<|im_start|>user\n{first if k == 0 else step}<|im_end|>\n")
        turn = _ids(tok, f"<|im_start|>assistant\n{'+' if lab else '-'}<|im_end|>\n")
        supervised.append(len(ref) + 3)
        ref += turn
    np.testing.assert_array_equal(enc.input_ids, ref)
    np.testing.assert_array_equal(enc.label_token_index, supervised)
    plus, minus = label_token_ids(tok)
    np.testing.assert_array_equal(np.asarray(ref)[supervised], [plus, plus, minus])


@pytest.mark.parametrize("n_images", [1, 2])
def test_visualprm_style_equals_visualprm_scoring_ids(tok, n_images):
    grids = GRIDS[:n_images]
    enc = encode_prm_example(tok, QUESTION, PLAIN, image_grid_thw=grids, mode="score", style="visualprm")
    question = "<image>\n" * n_images + QUESTION
    text = f"<|im_start|>system\n{VISUALPRM_SYSTEM_PROMPT}<|im_end|>\n"
    for k, step in enumerate(PLAIN):
        user = f"### Question:\n{question}\n\n### Solution Process:\n{step}" if k == 0 else step
        text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n"
    for g in grids:
        text = text.replace("<image>", _vision(int(np.prod(g)) // 4), 1)
    ref = np.asarray(_ids(tok, text))
    np.testing.assert_array_equal(enc.input_ids, ref)
    # the score of step k is read one token before its placeholder (VisualPRM's find_placeholder_idx)
    plus, _ = label_token_ids(tok)
    starts = [i for i in range(len(ref) - 2) if tok.decode(ref[max(0, i - 3):i]).endswith("assistant\n")
              and ref[i] == plus and tok.decode(ref[i + 1:i + 2]) == "<|im_end|>"]
    np.testing.assert_array_equal(enc.label_token_index, starts)
    np.testing.assert_array_equal(enc.label_positions, np.asarray(starts) - 1)


def test_chat_style_is_transformers_chat_template_layout(tok):
    """"chat": the image part, then the text, as the chat template renders VL-PRM's evaluation messages."""
    msgs = build_messages(QUESTION, PLAIN, num_images=1, style="chat")
    assert msgs[1]["content"][0] == {"type": "image"}
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>### Question:\n{QUESTION}" in text
    enc = encode_prm_example(tok, QUESTION, PLAIN, image_grid_thw=GRIDS[:1], style="chat")
    assert enc.text == text


def test_styles_differ_only_where_their_authors_differ(tok):
    texts = {name: encode_prm_example(tok, QUESTION, PLAIN, image_grid_thw=GRIDS[:1], style=name).text
             for name in PROMPT_STYLES}
    v = "<|vision_start|><|image_pad|><|vision_end|>"
    assert f"user\n{v}\n### Question:\n{QUESTION}" in texts["vlprm"]
    assert f"user\n### Question:\n{v}\n{QUESTION}\n\n" in texts["visualprm"]
    assert f"user\n{v}### Question:\n{QUESTION}" in texts["chat"]
    assert PRM_SYSTEM_PROMPT in texts["vlprm"] and VISUALPRM_SYSTEM_PROMPT in texts["visualprm"]
    # text-only prompts: no image, the question right after the header in every style
    for name in PROMPT_STYLES:
        t = encode_prm_example(tok, QUESTION, PLAIN, style=name).text
        assert f"user\n### Question:\n{QUESTION}\n\n### Solution Process:\n{PLAIN[0]}<|im_end|>" in t
    # an explicit system prompt still wins over the style's
    assert "<|im_start|>system\nS<|im_end|>" in encode_prm_example(tok, QUESTION, PLAIN, system_prompt="S",
                                                                   style="visualprm").text


def test_unknown_style_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown prompt style 'qwen'.*'chat', 'visualprm', 'vlprm'"):
        get_prompt_style("qwen")
    assert get_prompt_style().name == "vlprm"


def test_spec_stores_the_style_and_old_prm_json_means_chat(tmp_path):
    spec = PRMSpec(plus_id=3, minus_id=4, prompt_style="visualprm")
    spec.save(str(tmp_path))
    assert json.loads((tmp_path / "prm.json").read_text())["prompt_style"] == "visualprm"
    assert PRMSpec.load(str(tmp_path)) == spec
    assert PRMSpec(plus_id=3, minus_id=4).prompt_style == "vlprm"
    # a prm.json written before prompt styles existed: trained with the chat layout
    (tmp_path / "prm.json").write_text(json.dumps({"plus_id": 3, "minus_id": 4, "head": "lm_rows"}))
    assert PRMSpec.load(str(tmp_path)).prompt_style == "chat"
