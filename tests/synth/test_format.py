"""The rollout prompt of the tagged "[Visual Elements]"/"[Reasoning]" format (the parser, validation and
renderers are tested in tests/data/test_solution.py)."""
from jaxprm.synth import format as F


def test_prompt_mentions_format_and_question():
    p = F.build_rollout_prompt("How many shapes?", max_steps=12)
    assert "How many shapes?" in p and "[Visual Elements]" in p and "[Reasoning]" in p
    assert "<step_1>" in p and "<correct_answer>" in p and "\\boxed{answer}" in p and "12" in p
    pc = F.build_rollout_prompt("Which?", choices=["red", "blue"])
    assert "(A) red" in pc and "(B) blue" in pc and "letter" in pc
