"""Tiny files in each public format, written the way the public datasets store them."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # never decoded by the importers

SYSTEM = "You are an advanced AI assistant, designed to serve as a process supervision model."


def write_parquet(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl_rows(rows: list, path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def _sws(texts, counts):
    return [{"step": t, "score": c / n if n else 0.0, "num_mc_correct": c, "num_mc_total": n}
            for t, (c, n) in zip(texts, counts)]


def _text(t):
    return [{"type": "text", "text": t}]


def vlprm_conversation(question, visual, reasoning, labels):
    """The training transcript as convert_mc_to_prm_signal.py writes it (role/content, TRL parts)."""
    conv = [{"role": "system", "content": _text(SYSTEM)}]
    steps = [("[Visual Elements]\n" if i == 0 else "") + f"<step_{i + 1}>\n{t}\n</step_{i + 1}>"
             for i, t in enumerate(visual)]
    steps += [("[Reasoning]\n" if i == 0 else "") + f"<step_{i + 1}>\n{t}\n</step_{i + 1}>"
              for i, t in enumerate(reasoning)]
    steps[0] = f"### Question:\n{question}\n\n### Solution Process:\n{steps[0]}"
    for s, lab in zip(steps, labels):
        conv += [{"role": "user", "content": _text(s)}, {"role": "assistant", "content": _text(lab)}]
    return conv


A_VIS = ["The grid is 3x3 with the bottom-right cell missing.", "Row 1 holds three circles.", "Row 2 holds three squares."]
A_REA = ["Each row repeats a single shape.", "So the missing cell holds triangles: answer C."]
A_COUNTS = [(16, 16), (12, 16), (0, 16), (4, 16), (0, 16)]

B_VIS = ["There is a toddler on grass.", "The child holds a red frisbee.", "An adult crouches behind."]
B_REA = ["The child looks about 2 years old."]
B_COUNTS = [(8, 16), (2, 16), (0, 16), (1, 16)]

C_VIS = ["The bar for 2020 reaches 40."]
C_REA = ["40 is the largest value, so 2020."]
C_COUNTS = [(16, 16), (16, 16)]


def vlprm_raw_rows() -> list[dict]:
    common = {"consensus_filtering_algo_label": "o4-mini_incorrect_and_MC_agrees_and_disagrees",
              "verifier_identified_first_incorrect_step_solution": "[Perception]\n<analysis_1>\nok\n</analysis_1>"}
    a = {
        "id": "a-1",
        # the error is the 2nd reasoning step, so the transcript reaches the [Reasoning] header
        "conversations": vlprm_conversation("Which tile completes the grid?", A_VIS, A_REA, "++++-"),
        "first_incorrect_step": "['Reasoning', 1]",
        "steps_with_score": _sws(A_VIS + A_REA, A_COUNTS),
        "rollout_ground_truth_answer": "C",
        "image": "images/RAVEN/a.png",
        "image_qwen_smart_resize": "images/RAVEN/a_qwen_smart_resize.png",
        "source": "RAVEN",
        "question_type": "abstract_visual_reasoning",
        "question": "Which tile completes the grid?",
        **common,
    }
    b = {
        "id": "b-2",
        # error inside Visual Elements: the transcript stops before the [Reasoning] header
        "conversations": vlprm_conversation("How old is the boy?", B_VIS[:2], [], "+-"),
        "first_incorrect_step": "['Visual Elements', 1]",
        "steps_with_score": _sws(B_VIS + B_REA, B_COUNTS),
        "rollout_ground_truth_answer": "1",
        "image": "images/VQAv2/b.png",
        "image_qwen_smart_resize": "images/VQAv2/b_qwen_smart_resize.png",
        "source": "VQAv2",
        "question_type": "vqa",
        "question": "How old is the boy?",
        **common,
    }
    c = {
        "id": "c-3",
        "conversations": vlprm_conversation("Which year is highest?", C_VIS, C_REA, "++"),
        "first_incorrect_step": None,
        "steps_with_score": _sws(C_VIS + C_REA, C_COUNTS),
        "rollout_ground_truth_answer": "2020",
        "image": "images/DVQA/c.png",
        "image_qwen_smart_resize": "images/DVQA/c_qwen_smart_resize.png",
        "source": "DVQA",
        "question_type": "chart",
        "question": "Which year is highest?",
        **common,
        "consensus_filtering_algo_label": "o4-mini_correct_and_MC_agrees",
    }
    return [a, b, c]


def vlprm_rollout_row(scores=(0.5, 0.25, 0.0)) -> dict:
    """A row of the rollout JSONL the dataset was built from: a sectioned ``response`` and (here)
    only fractional MC scores."""
    response = ("[Visual Elements]\n<step_1>\nA child stands on grass.\n</step_1>\n<step_2>\nHe holds a frisbee."
                "\n</step_2>\n\n[Reasoning]\n<step_1>\nHe looks like a toddler.\n</step_1>\n\n"
                "<correct_answer>\n$\\boxed{2}$\n</correct_answer>")
    texts = ["A child stands on grass.", "He holds a frisbee.", "He looks like a toddler."]
    return {
        "uid": "u-1",
        "image": "images/COCO_1.jpg",
        "question": "How old is the young boy?",
        "answer": "1",
        "response": response,
        "steps_with_score": [{"step": t, "score": s} for t, s in zip(texts, scores)],
    }


def vlprm_train_rows() -> list[dict]:
    def msgs(question, turns):
        m = [{"role": "system", "content": [{"type": "text", "text": SYSTEM, "index": None}]}]
        for k, (text, lab) in enumerate(turns):
            content = [{"type": "text", "text": text, "index": None}]
            if k == 0:
                text = f"### Question:\n{question}\n\n### Solution Process:\n{text}"
                content = [{"type": "text", "text": text, "index": None}, {"type": "image", "text": None, "index": 0}]
            m += [{"role": "user", "content": content},
                  {"role": "assistant", "content": [{"type": "text", "text": lab, "index": None}]}]
        return m

    r0 = {"image": {"bytes": PNG, "path": None},
          "messages": msgs("Which tile completes the grid?", [
              ("[Visual Elements]\n<step_1>\nThe grid is 3x3.\n</step_1>", "+"),
              ("<step_2>\nRow 1 holds circles.\n</step_2>", "+"),
              ("[Reasoning]\n<step_1>\nRows repeat a shape, so C.\n</step_1>", "-")])}
    r1 = {"image": {"bytes": None, "path": "images/x.png"},
          "messages": msgs("Count the cubes.", [("[Visual Elements]\n<step_1>\nThere are 3 cubes.\n</step_1>", "+")])}
    return [r0, r1]


def visualprm_rows() -> list[dict]:
    conv = {
        "id": -1,
        "image": "vp/1.png",
        "conversations": [
            {"from": "system", "value": "You are an advanced AI assistant..."},
            {"from": "human", "value": "### Question:\n<image>\nWhat is x?\n\n### Solution Process:\nStep one: x = 2 + 1."},
            {"from": "gpt", "value": "+"},
            {"from": "human", "value": "Step two: so x = 4."},
            {"from": "gpt", "value": "-"},
        ],
    }
    raw = {
        "image": "vp/2.png",
        "question": "<image>\nFind y.",
        "answer": "3",
        "response": "a\n\nb\n\nc",
        "steps_with_score": [
            {"step": "y + 1 = 4.", "score": 0.25, "num_mc_correct": 4, "num_mc_total": 16},
            {"step": "So y = 5.", "score": 0.0, "num_mc_correct": 0, "num_mc_total": 16},
            {"step": "Answer: 5.", "score": 0.0, "num_mc_correct": 0, "num_mc_total": 0},  # early stop
        ],
        "num_mc_sequences": 16,
    }
    frac = {
        "id": "vp-frac",
        "image": ["vp/3a.png", "vp/3b.png"],
        "question": "Compare the two images.",
        "answer": "left",
        "steps_with_score": [{"step": "The left one is bigger.", "score": 0.75},
                             {"step": "Answer: left.", "score": 0.5}],
        "num_mc_sequences": 4,
    }
    return [conv, raw, frac]


def vpb_rows() -> list:
    r1 = {"image": ["vpb/1.png"], "question": "<image>\nWhat is the area?", "answer": "12",
          "response": {"steps": ["Width is 3.", "Height is 4.", "Let us think.", "Area is 7."],
                       "process_correctness": [1, 1, 0, -1]},
          "policy_model": "InternVL2.5-8B", "data_source": "MathVerse"}
    r2 = {"image": ["vpb/2.png"], "question": "Is it red?", "answer": "yes",
          "response": json.dumps({"steps": ["The ball is red.", "So no."], "process_correctness": [1, -1]}),
          "policy_model": "GPT-4o", "data_source": "MMMU"}
    return [r1, r2]


# -- golden rows for issue 13 (VL-PRM300K / VL-PRM rollouts), written to the published layouts -------
def _part(text):
    return {"type": "text", "text": text, "index": None}


def golden_vlprm_train_rows() -> list[dict]:
    """``ob11/VL-PRM300K-V1-train``: ``image`` is an HF Image struct; the first user text starts with
    ``"<image>\\n"``; row 1 is the variant with a ``{"type": "image"}`` part before the text."""
    sys_turn = {"role": "system", "content": [_part(SYSTEM)]}
    r0 = {"image": {"bytes": PNG, "path": "0001.png"},
          "messages": [
              sys_turn,
              {"role": "user", "content": [_part(
                  "<image>\n### Question:\nWhat colour is the ball?\n\n### Solution Process:\n"
                  "[Visual Elements]\n<step_1>\nA ball lies on the floor.\n</step_1>")]},
              {"role": "assistant", "content": [_part("+")]},
              {"role": "user", "content": [_part("<step_2>\nThe ball is red.\n</step_2>")]},
              {"role": "assistant", "content": [_part("+")]},
              {"role": "user", "content": [_part("[Reasoning]\n<step_1>\nSo the answer is blue.\n</step_1>")]},
              {"role": "assistant", "content": [_part("-")]},
          ]}
    r1 = {"image": {"bytes": None, "path": "images/geo/7.png"},
          "messages": [
              sys_turn,
              {"role": "user", "content": [
                  {"type": "image", "text": None, "index": 0},
                  _part("### Question:\nFind x.\n\n### Solution Process:\n"
                        "[Visual Elements]\n<step_1>\nThe triangle has angles 50 and 60.\n</step_1>")]},
              {"role": "assistant", "content": [_part("+")]},
              {"role": "user", "content": [_part("[Reasoning]\n<step_1>\nx = 180 - 110 = 70.\n</step_1>")]},
              {"role": "assistant", "content": [_part("+")]},
          ]}
    return [r0, r1]


GOLDEN_ROLLOUT_PROMPT = ("You are given an image and a question. Describe the visual elements, then reason step "
                         "by step.\n<image>\nQuestion: How many apples are on the table?")


def golden_vlprm_rollout_row() -> dict:
    """A VL-PRM rollout output row (``rollout_data_generation``): no judge field at all; 16 MC
    continuations per step."""
    response = ("[Visual Elements]\n<step_1>\nThere is a wooden table.\n</step_1>\n<step_2>\n"
                "Three apples lie on it.\n</step_2>\n\n[Reasoning]\n<step_1>\nCounting gives 4.\n</step_1>\n\n"
                "<correct_answer>\n$\\boxed{4}$\n</correct_answer>")
    steps = [("There is a wooden table.", 16), ("Three apples lie on it.", 10), ("Counting gives 4.", 0)]
    return {
        "image": "images/COCO/000123.jpg",
        "question": GOLDEN_ROLLOUT_PROMPT,
        "answer": "3",
        "uid": "roll-7",
        "image_path": "/data/images/COCO/000123.jpg",
        "response": response,
        "steps_with_score": [{"step": t, "score": c / 16, "num_mc_correct": c, "num_mc_total": 16}
                             for t, c in steps],
    }


def _golden_raw(rid, question, visual, reasoning, counts, fis, consensus, conv_labels, n_conv_vis=None):
    """A ``VL_PRM300K_V2.parquet`` row; ``conversations`` is truncated at the first error."""
    n_conv_vis = len(visual) if n_conv_vis is None else n_conv_vis
    n_conv = len(conv_labels)
    return {
        "id": rid,
        "question": question,
        "image": f"images/golden/{rid}.png",
        "image_qwen_smart_resize": f"images/golden/{rid}_qwen_smart_resize.png",
        "steps_with_score": _sws(visual + reasoning, counts),
        "first_incorrect_step": fis,
        "conversations": vlprm_conversation(question, visual[:min(n_conv, n_conv_vis)],
                                            reasoning[:max(0, n_conv - n_conv_vis)], conv_labels),
        "rollout_ground_truth_answer": "A",
        "consensus_filtering_algo_label": consensus,
        "verifier_identified_first_incorrect_step_solution": "[Perception]\n<analysis_1>\n...\n</analysis_1>",
        "source": "CLEVR",
        "question_type": "counting",
    }


def golden_vlprm_raw_rows() -> list[dict]:
    agrees_dis = "o4-mini_incorrect_and_MC_agrees_and_disagrees"
    return [
        # judge's first error: Visual Elements step 2 (zero-based); MC disagrees on steps 1 and 2
        _golden_raw("g-vis", "How many cubes?", ["Two red cubes.", "One blue sphere.", "One green cube."],
                    ["So three cubes: A."], [(16, 16), (0, 16), (5, 16), (16, 16)],
                    "['Visual Elements', 2]", agrees_dis, "++-"),
        # judge's first error: Reasoning step 0, right after 1 Visual Elements step
        _golden_raw("g-rea", "Is the bar taller?", ["The left bar reaches 5."],
                    ["5 is less than 3.", "So no."], [(0, 16), (3, 16), (0, 16)],
                    "['Reasoning', 0]", agrees_dis, "+-"),
        # the judge found no error
        _golden_raw("g-ok", "What shape?", ["A circle is drawn."], ["So: circle."], [(16, 16), (16, 16)],
                    "None", "o4-mini_correct_and_MC_agrees", "++"),
    ]


def golden_vlprm_raw_step_header_row() -> dict:
    """Error in Visual Elements (step 0): the transcript stops before ``[Reasoning]``, but the first
    reasoning step's text in ``steps_with_score`` still opens with its ``[Reasoning]`` header."""
    return _golden_raw("g-hdr", "How many birds?", ["Two birds sit on a wire.", "The sky is grey."],
                       ["[Reasoning]\nTwo birds are visible.", "So the answer is 2."],
                       [(4, 16), (12, 16), (9, 16), (9, 16)], "['Visual Elements', 0]",
                       "o4-mini_incorrect_and_MC_agrees_and_disagrees", "-")
