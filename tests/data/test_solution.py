"""The solution text format (``jaxprm.data.solution``): \\boxed{}, splitting into steps, the tagged
"[Visual Elements]"/"[Reasoning]" layout (parser, validation, renderers)."""
import pytest

from jaxprm.data import solution as F
from jaxprm.data import synthetic as syn
from jaxprm.data.schema import PERCEPTION, REASONING, Step
from jaxprm.data.solution import (clean_step, extract_boxed, extract_final_answer, has_answer, join_steps, split_steps,
                                  split_steps_with_kinds)


# -- \\boxed{} -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{5}", "5"),
        (r"\boxed{1} then later \boxed{2}", "2"),
        (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
        (r"$\boxed{ 12 \text{ cm} }$.", r"12 \text{ cm}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5 is it", "5"),
        (r"\boxed{3} and a truncated \boxed{4", "3"),
        (r"truncated \boxed{4", None),
        ("no box here", None),
        ("", None),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_format_solution_and_back():
    steps = [Step("I see a red circle.", PERCEPTION), Step("So 1. The answer is \\boxed{1}.", REASONING)]
    text = F.format_solution(steps)
    assert text == "[Visual Elements]\nI see a red circle.\n\n[Reasoning]\nSo 1. The answer is \\boxed{1}."
    assert split_steps_with_kinds(text) == [(s.text, s.kind) for s in steps]
    assert extract_final_answer(text) == "1"


# -- steps ----------------------------------------------------------------------------------------------------
def test_split_join_roundtrip_on_synthetic_solutions():
    for rec in syn.generate_records(8, seed=2):
        text = syn.format_solution(rec.steps)
        assert split_steps(text) == [s.text for s in rec.steps]
        assert [k for _, k in split_steps_with_kinds(text)] == [s.kind for s in rec.steps]
        assert extract_final_answer(text) == rec.meta["predicted_answer"]
        assert split_steps(join_steps([s.text for s in rec.steps])) == [s.text for s in rec.steps]


def test_tagged_vlprm_layout_and_answers():
    text = ("[Visual Elements]\n<step_1>\nA red circle at the top.\n</step_1>\n<step_2>\nTwo blue squares.\n</step_2>\n\n"
            "[Reasoning]\n<step_1>\n1 + 2 = 3.\n</step_1>\n<correct_answer>\n3\n</correct_answer>")
    assert split_steps_with_kinds(text) == [("A red circle at the top.", "perception"), ("Two blue squares.", "perception"),
                                            ("1 + 2 = 3.", "reasoning")]
    assert extract_final_answer(text) == "3"
    assert clean_step("[Reasoning]\n<step_2>\nSo 5.\n</step_2>") == "So 5."
    assert clean_step("[Reasoning]") == ""
    assert has_answer("so \\boxed{\\frac{1}{2}}.") and extract_final_answer("x \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert not has_answer("no answer here") and split_steps("  \n\n ") == []
    assert split_steps("a\n \nb\r\n\r\nc") == ["a", "b", "c"]


# -- the tagged layout: parser, validation, renderers ----------------------------------------------------------
GOOD = """[Visual Elements]
<step_1>
There are two red circles.
</step_1>
<step_2>
There is one blue square.
</step_2>

[Reasoning]
<step_1>
2 + 1 = 3.
</step_1>
<step_2>
So there are 3 shapes.
</step_2>

<correct_answer>
$\\boxed{3}$
</correct_answer>"""


def test_parse_good():
    p = F.parse_solution(GOOD)
    assert p.ok, p.detail
    assert p.perception == ["There are two red circles.", "There is one blue square."]
    assert p.reasoning == ["2 + 1 = 3.", "So there are 3 shapes."]
    assert p.answer == "3"
    steps = p.steps()
    assert [s.kind for s in steps] == [PERCEPTION, PERCEPTION, REASONING, REASONING]
    assert all(s.label is None and s.judge is None for s in steps)


def test_perception_alias_and_answer_in_last_step():
    text = GOOD.replace("[Visual Elements]", "[Perception]").split("<correct_answer>")[0]
    text = text.replace("So there are 3 shapes.", "So there are 3 shapes. The answer is \\boxed{3}.")
    p = F.parse_solution(text)
    assert p.ok and p.answer == "3" and len(p.perception) == 2


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda t: "", "empty_output"),
        (lambda t: t.replace("[Visual Elements]", ""), "no_visual_section"),
        (lambda t: t.replace("[Reasoning]", ""), "no_reasoning_section"),
        (lambda t: "[Reasoning]\n<step_1>\nx\n</step_1>\n[Visual Elements]\n<step_1>\ny\n</step_1>\n\\boxed{1}",
         "sections_out_of_order"),
        (lambda t: t.replace("<step_1>\nThere are two red circles.\n</step_1>\n<step_2>\nThere is one blue square.\n</step_2>",
                             "I see shapes."), "no_perception_steps"),
        (lambda t: t.replace("<step_1>\n2 + 1 = 3.\n</step_1>\n<step_2>\nSo there are 3 shapes.\n</step_2>", "So 3."),
         "no_reasoning_steps"),
        (lambda t: t.replace("</step_1>", "</step_2>", 1), "bad_step_tags"),
        (lambda t: t.replace("There is one blue square.\n</step_2>", "There is one blue square.", 1), "bad_step_tags"),
        (lambda t: t.replace("<step_2>\nThere is one", "<step_3>\nThere is one").replace(
            "blue square.\n</step_2>", "blue square.\n</step_3>"), "bad_step_numbering"),
        (lambda t: t.replace("There are two red circles.", " "), "empty_step"),
        (lambda t: t.split("<correct_answer>")[0], "no_boxed_answer"),
    ],
)
def test_malformed(mutate, reason):
    p = F.parse_solution(mutate(GOOD))
    assert not p.ok
    assert p.error == reason, (p.error, p.detail)
    assert p.error in F.MALFORMED_REASONS


def test_too_many_steps():
    perc = [f"Observation {i}." for i in range(13)]
    p = F.parse_solution(F.render_solution(perc, ["So 1."], "1"))
    assert p.error == "too_many_perception_steps"
    p = F.parse_solution(F.render_solution(["Seen."], [f"r{i}" for i in range(13)], "1"))
    assert p.error == "too_many_reasoning_steps"
    assert F.parse_solution(F.render_solution(perc, ["So 1."], "1"), max_steps_per_section=13).ok


def test_render_parse_roundtrip_and_prefixes():
    perc, reas = ["a b", "c d"], ["e", "f \\boxed{7}"]
    text = F.render_solution(perc, reas, "7")
    p = F.parse_solution(text)
    assert p.ok and p.perception == perc and p.reasoning == reas and p.answer == "7"
    flat = p.flat()
    for k in range(1, len(flat) + 1):
        prefix = F.render_prefix(flat, k)
        assert F.parse_prefix(prefix) == flat[:k]
        assert "<correct_answer>" not in prefix
        full = F.join_prefix(prefix, F.render_continuation(flat, k, "7"))
        q = F.parse_solution(full)
        assert q.ok and q.flat() == flat and q.answer == "7", (k, full)
    # a server that restates the whole solution instead of continuing
    assert F.join_prefix(F.render_prefix(flat, 1), text) == text
    with pytest.raises(ValueError):
        F.render_prefix(flat, 0)


# -- where the former copies disagreed ---------------------------------------------------------------------------
def test_header_with_text_on_the_same_line():
    # search's copy kept "[Reasoning] So 5." (header not alone on its line) with no kind; the importers' copy
    # took the header off
    assert F.clean_step_with_kind("[Reasoning] So 5.") == ("So 5.", REASONING)
    text = "[Visual Elements] I see 2 dots.\n\n[Reasoning] So 2.\n\nThe answer is \\boxed{2}."
    assert split_steps_with_kinds(text) == [
        ("I see 2 dots.", PERCEPTION), ("So 2.", REASONING), ("The answer is \\boxed{2}.", REASONING)]


def test_step_wrapper_unclosed_mismatched_or_in_capitals():
    # the importers' copy unwrapped only "<step_k>...</step_k>" with the same k, in lower case; search's
    # copy left a mismatched closing tag in the text
    assert F.clean_step_with_kind("[Visual Elements]\n<step_1>\nI see 2 dots.") == ("I see 2 dots.", PERCEPTION)
    assert clean_step("<step_1>\nx\n</step_2>") == "x"
    assert clean_step("<STEP_3>y</STEP_3>") == "y"
    text = "[Visual Elements]\n<step_1>\na\n</step_2>\n[Reasoning]\n<step_1>\nb\n</step_1>"
    assert split_steps_with_kinds(text) == [("a", PERCEPTION), ("b", REASONING)]


def test_headers_with_spaces_or_lower_case():
    # parse_solution accepted "[ Reasoning ]" / "[reasoning]"; search's copy did not see those headers
    text = ("[ visual elements ]\n<step_1>\na\n</step_1>\n[reasoning]\n<step_1>\nb\n</step_1>\n"
            "<correct_answer>\n1\n</correct_answer>")
    assert split_steps_with_kinds(text) == [("a", PERCEPTION), ("b", REASONING)]
    p = F.parse_solution(text.replace("\n1\n", "\n$\\boxed{1}$\n"))
    assert p.ok and p.flat() == [(PERCEPTION, "a"), (REASONING, "b")]


def test_parse_prefix_reads_as_split_steps_does():
    # parse_prefix had its own reader: only complete, lower-case pairs, empty steps kept
    text = ("[Visual Elements]\n<STEP_1>\na\n</STEP_1>\n<step_2>\n</step_2>\n[Reasoning]\n<step_1>\nb\n</step_1>\n"
            "<step_2>\nc")
    assert F.parse_prefix(text) == [(PERCEPTION, "a"), (REASONING, "b"), (REASONING, "c")]
    assert [(k, s) for s, k in split_steps_with_kinds(text)] == F.parse_prefix(text)
    assert F.parse_prefix("<step_1>\nbefore any header\n</step_1>\n[Reasoning]\n<step_1>\nb\n</step_1>") == [
        (REASONING, "b")]
    assert F.split_tagged_steps("no tags\n\nhere") == [] and F.parse_prefix("") == []
