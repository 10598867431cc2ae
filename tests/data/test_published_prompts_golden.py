"""Golden tests (issue 13): VisualPRM400K conversations and VisualProcessBench rows (several images,
``response`` as an object) written to the published layouts, expected records by hand from the
authors' rules; and the round trip a user relies on: a published training row, imported with the
defaults and encoded in its family's prompt style, gives back the exact turn texts the authors trained
on (their ``<image>`` placeholder standing for the backbone's image tokens).

Layouts:
* VisualPRM400K (``visualprm_data_pipeline_postprocess.py``, ``item2conv_prm``): ``{"id": -1, "image",
  "conversations": [system PRM_SYSTEM_PROMPT, human "### Question:\\n{question}\\n\\n### Solution
  Process:\\n{step_1}", gpt "+"/"-", human step_k, ...]}``; the pipeline's question is the policy
  prompt with ``"<image>\\n"`` prepended (``visualprm_data_pieline.py``: a question without the
  placeholder gets one in front); with ``--early-stop`` the conversation ends at the first "-".
* VisualProcessBench (dataset card): ``image`` a list of paths, ``question``, ``answer``, ``response``
  ``{"steps": [...], "process_correctness": [1 | 0 | -1, ...]}``, ``policy_model``, ``data_source``.
"""
import json

import numpy as np
import pytest

from jaxprm.data.formats import ImportStats, read_visualprm400k, read_visualprocessbench, read_vlprm300k_train
from jaxprm.data.prompt import PRM_SYSTEM_PROMPT, VISUALPRM_SYSTEM_PROMPT, encode_prm_example
from jaxprm.data.tokenizer import build_tokenizer
from tests.data.fixtures_formats import golden_vlprm_train_rows, write_jsonl_rows, write_parquet

Q1 = ("Which number is missing in the grid?\nAnswer the question using a single word or phrase, and put "
      "the final answer in \\boxed{}.")
Q2 = "How many triangles are there?"


def _conv(question, steps, labels):
    conv = [{"from": "system", "value": VISUALPRM_SYSTEM_PROMPT}]
    for k, (s, lab) in enumerate(zip(steps, labels)):
        value = f"### Question:\n<image>\n{question}\n\n### Solution Process:\n{s}" if k == 0 else s
        conv += [{"from": "human", "value": value}, {"from": "gpt", "value": lab}]
    return conv


def visualprm400k_rows():
    return [
        # early stop: the conversation ends at the first "-"
        {"id": -1, "image": "MathV360K/images/grid_17.png",
         "conversations": _conv(Q1, ["The first row is 2, 4, 6.", "So each row adds 2.", "The missing number is 9."],
                                ["+", "+", "-"])},
        {"id": -1, "image": ["geo/a.png"],
         "conversations": _conv(Q2, ["I count 3 triangles.", "So the answer is \\boxed{3}."], ["+", "+"])},
    ]


def vpb_rows():
    return [
        {"image": ["MMMU/q1_a.png", "MMMU/q1_b.png"],
         "question": "<image 1> shows a cell and <image 2> its nucleus. Which stage is it?",
         "answer": "B",
         "response": {"steps": ["The chromosomes are aligned at the centre.", "This is metaphase.",
                                "So the stage is (A) prophase."],
                      "process_correctness": [1, 0, -1]},
         "policy_model": "gpt-4o", "data_source": "MMMU"},
        {"image": ["MathVerse/7.png"], "question": "Find the area.", "answer": "12",
         "response": {"steps": ["Base 4, height 3.", "Area = 4 * 3 / 2 = 6."], "process_correctness": [1, 1]},
         "policy_model": "Qwen2.5-VL-72B", "data_source": "MathVerse"},
    ]


def test_visualprm400k_conversations(tmp_path):
    path = write_jsonl_rows(visualprm400k_rows(), tmp_path / "MathV360K_prm.jsonl")
    stats = ImportStats()
    a, b = read_visualprm400k(path, on_error="skip", stats=stats)
    assert (stats.records, stats.skipped) == (2, 0)
    # "id": -1 is the pipeline's placeholder, replaced by file:line
    assert (a.id, b.id) == ("MathV360K_prm.jsonl:1", "MathV360K_prm.jsonl:2")
    assert a.question == Q1 and b.question == Q2  # the "<image>\n" placeholder removed
    assert a.images == ["MathV360K/images/grid_17.png"] and b.images == ["geo/a.png"]
    assert [(s.text, s.kind, s.label) for s in a.steps] == [
        ("The first row is 2, 4, 6.", "reasoning", 1), ("So each row adds 2.", "reasoning", 1),
        ("The missing number is 9.", "reasoning", 0)]
    assert b.labels == [1, 1]
    assert a.meta["label_rule"] == {"name": "given", "from": "conversations"}


def test_visualprocessbench_several_images_and_response_object(tmp_path):
    path = write_jsonl_rows(vpb_rows(), tmp_path / "test.jsonl")
    a, b = read_visualprocessbench(path, image_root=tmp_path / "imgs", check_images=False)
    root = str(tmp_path / "imgs")
    assert a.images == [f"{root}/MMMU/q1_a.png", f"{root}/MMMU/q1_b.png"]
    assert a.id == "test.jsonl:1" and a.answer == "B"
    # 1 -> "+", -1 -> "-", 0 (neutral) not scored by default
    assert a.labels == [1, None, 0]
    assert a.meta["process_correctness"] == [1, 0, -1]
    assert a.meta["policy_model"] == "gpt-4o" and a.meta["data_source"] == "MMMU"
    assert [s.text for s in a.steps] == vpb_rows()[0]["response"]["steps"]
    # "<image k>" references are part of MMMU's question text, not InternVL placeholders: kept
    assert a.question == vpb_rows()[0]["question"]
    assert b.labels == [1, 1] and len(b.images) == 1
    assert next(read_visualprocessbench(path, neutral="negative", check_images=False)).labels == [1, 0, 0]


# -- round trip: published row -> default import -> family's prompt == the authors' turn texts ------------
@pytest.fixture(scope="module")
def tok():
    corpus = [Q1, Q2, PRM_SYSTEM_PROMPT, VISUALPRM_SYSTEM_PROMPT, "### Question:\n### Solution Process:\n"]
    return build_tokenizer(corpus * 3, vocab_size=600)


def _user_turns(text):
    """The user turns of a ChatML string."""
    return [t.split("<|im_end|>")[0] for t in text.split("<|im_start|>user\n")[1:]]


VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def test_visualprm400k_row_round_trips_in_visualprm_style(tmp_path, tok):
    path = write_jsonl_rows(visualprm400k_rows(), tmp_path / "v.jsonl")
    for row, rec in zip(visualprm400k_rows(), read_visualprm400k(path)):
        enc = encode_prm_example(tok, rec.question, [s.text for s in rec.steps], rec.labels,
                                 image_grid_thw=np.array([[1, 2, 2]]), mode="train", style="visualprm")
        published = [t["value"].replace("<image>", VISION) for t in row["conversations"] if t["from"] == "human"]
        assert _user_turns(enc.text) == published
        assert f"<|im_start|>system\n{row['conversations'][0]['value']}<|im_end|>" in enc.text
        labels = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        assert [tok.decode([i]) for i in enc.input_ids[enc.label_token_index]] == labels


def test_vlprm300k_train_row_round_trips_in_vlprm_style(tmp_path, tok):
    rows = golden_vlprm_train_rows()
    path = write_parquet(rows, tmp_path / "train.parquet")
    for row, rec in zip(rows, read_vlprm300k_train(path, check_images=False)):
        # "<image>\n" in the text: the released trainer replaces it in place ("vlprm"); an image part
        # before the text is rendered by transformers' chat template, image then text ("chat")
        part = any(p["type"] == "image" for t in row["messages"] for p in t["content"])
        enc = encode_prm_example(tok, rec.question, [s.text for s in rec.steps], rec.labels,
                                 image_grid_thw=np.array([[1, 2, 2]]), mode="train",
                                 style="chat" if part else "vlprm")
        published = []
        for t in row["messages"]:
            if t["role"] == "user":
                published.append("".join(VISION if p["type"] == "image" else p["text"].replace("<image>", VISION)
                                         for p in t["content"]))
        assert _user_turns(enc.text) == published
        labels = [t["content"][0]["text"] for t in row["messages"] if t["role"] == "assistant"]
        assert [tok.decode([i]) for i in enc.input_ids[enc.label_token_index]] == labels


def test_response_given_as_json_string_reads_the_same(tmp_path):
    rows = vpb_rows()
    as_str = [dict(r, response=json.dumps(r["response"])) for r in rows]
    a = list(read_visualprocessbench(write_jsonl_rows(rows, tmp_path / "a.jsonl"), check_images=False))
    b = list(read_visualprocessbench(write_jsonl_rows(as_str, tmp_path / "b.jsonl"), check_images=False))
    assert [(r.question, r.labels, [s.text for s in r.steps]) for r in a] == \
           [(r.question, r.labels, [s.text for s in r.steps]) for r in b]
