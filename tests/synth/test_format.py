"""The tagged "[Visual Elements]"/"[Reasoning]" format: prompt, parser, validation, renderers."""
import pytest

from jaxprm.data.schema import PERCEPTION, REASONING
from jaxprm.synth import format as F

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


def test_prompt_mentions_format_and_question():
    p = F.build_rollout_prompt("How many shapes?", max_steps=12)
    assert "How many shapes?" in p and "[Visual Elements]" in p and "[Reasoning]" in p
    assert "<step_1>" in p and "<correct_answer>" in p and "\\boxed{answer}" in p and "12" in p
    pc = F.build_rollout_prompt("Which?", choices=["red", "blue"])
    assert "(A) red" in pc and "(B) blue" in pc and "letter" in pc


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
