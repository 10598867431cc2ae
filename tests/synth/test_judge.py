"""Judge prompt, output parsing, re-asks, and the scripted judge."""

import numpy as np
import pytest

from jaxprm.data import synthetic as S
from jaxprm.synth import format as F
from jaxprm.synth import puzzle as PZ
from jaxprm.synth.judge import (
    JudgeParseError,
    ScriptedJudge,
    VLMJudge,
    build_judge_prompt,
    parse_judge_output,
)
from jaxprm.synth.questions import synthetic_questions


@pytest.mark.parametrize(
    "text, expected",
    [
        ('analysis...\n{"section": "Reasoning", "index": 1}', ("Reasoning", 1, 4)),
        ('{"section": "Visual Elements", "index": 0}', ("Visual Elements", 0, 0)),
        ('```json\n{"section": "visual elements", "index": "2"}\n```', ("Visual Elements", 2, 2)),
        ('{"section": "[Perception]", "step": 3}', ("Visual Elements", 2, 2)),
        ('{"section": null, "index": null}', (None, None, None)),
        ('{"first_incorrect_step": null}', (None, None, None)),
        ('{"first_incorrect_step": ["Reasoning", 0]}', ("Reasoning", 0, 3)),
        ('{"first_incorrect_step": {"section": "Reasoning", "index": 0}}', ("Reasoning", 0, 3)),
        ('{"verdict": "no error"}', (None, None, None)),
        ("No error.", (None, None, None)),
        ('I quote {"a": 1} then conclude {"section": "Reasoning", "index": 0}', ("Reasoning", 0, 3)),
        # VL-PRM's analysis/conclusion format: the last analysis block is the first error
        ("[Visual Elements]\n<analysis_1>ok</analysis_1>\n<analysis_2>ok</analysis_2>\n<analysis_3>ok</analysis_3>\n"
         "[Reasoning]\n<analysis_1>ok</analysis_1>\n<analysis_2>wrong: 2+2 is not 5</analysis_2>\n"
         "<conclusion>\nIncorrect\n</conclusion>", ("Reasoning", 1, 4)),
        ("[Visual Elements]\n<analysis_1>the dot is blue, not red</analysis_1>\n<conclusion>Incorrect</conclusion>",
         ("Visual Elements", 0, 0)),
        ("[Visual Elements]\n<analysis_1>ok</analysis_1>\n<conclusion>Correct</conclusion>", (None, None, None)),
    ],
)
def test_parse_judge_output(text, expected):
    assert parse_judge_output(text, n_perc=3, n_reas=2) == expected


@pytest.mark.parametrize(
    "text",
    [
        "I think step 2 is wrong",
        '{"section": "Reasoning", "index": 5}',  # out of range
        '{"section": "Visual Elements", "index": -1}',
        '{"section": "Summary", "index": 0}',
        '{"section": "Reasoning"}',
        '{"index": 2}',
        "<conclusion>Maybe</conclusion>",
        "<conclusion>Incorrect</conclusion>",  # no analysis block to locate the error
    ],
)
def test_parse_judge_output_rejects(text):
    with pytest.raises(JudgeParseError):
        parse_judge_output(text, n_perc=3, n_reas=2)


class FakeClient:
    def __init__(self, replies):
        self.replies = list(replies)
        self.messages = []

    def chat(self, messages, **kw):
        self.messages.append(messages)
        return [self.replies.pop(0)]


def _steps():
    return F.parse_solution(F.render_solution(["a", "b", "c"], ["d", "e"], "1")).steps()


def test_vlm_judge_reasks_unparseable_output():
    q = synthetic_questions(1)[0]
    client = FakeClient(["hmm", '{"section": "Reasoning", "index": 9}', 'ok\n{"section": "Reasoning", "index": 1}'])
    v = VLMJudge(client, max_attempts=3).judge(q, _steps())
    assert v.ok and v.first_error == 4 and v.section == "Reasoning" and v.index == 1
    assert v.attempts == 3 and v.parse_failures == 2
    assert v.step_values(5) == [1, 1, 1, 1, 0]
    msg = client.messages[0][-1]["content"]
    assert msg[0]["type"] == "image_url" and msg[0]["image_url"]["url"].startswith("data:image/png;base64,")
    text = msg[-1]["text"]
    assert "<solution>" in text and "<step_3>" in text and f"<question>\n{q.question}\n</question>" in text
    assert f"The correct final answer to the problem is: {q.answer}" in text


def test_vlm_judge_gives_up():
    q = synthetic_questions(1)[0]
    v = VLMJudge(FakeClient(["?"] * 2), max_attempts=2).judge(q, _steps())
    assert not v.ok and v.parse_failures == 2 and v.step_values(5) == [None] * 5
    assert "unparseable" in v.error


def test_judge_prompt_without_answer():
    q = synthetic_questions(1)[0]
    assert "correct final answer" not in build_judge_prompt(q, _steps(), include_answer=False)


def _solutions(q):
    p = PZ.puzzle_from_question(q)
    clean = S.solve(p)
    out = [(clean, None)]
    for kind in ("perception", "reasoning"):
        try:
            bad, info = S.inject_error(p, clean, np.random.default_rng(0), kind=kind)
            out.append((bad, info["step"]))
        except S.InjectionError:
            pass
    return out


def test_scripted_judge_noise_free_is_ground_truth():
    j = ScriptedJudge(noise=0.0)
    for q in synthetic_questions(12, seed=1):
        for steps, err in _solutions(q):
            v = j.judge(q, steps)
            assert v.ok and v.first_error == err
            if err is not None:
                assert (v.section == "Visual Elements") == (steps[err].kind == "perception")
            # what it would write over HTTP parses back to the same verdict
            n_perc = sum(s.kind == "perception" for s in steps)
            assert parse_judge_output(j.respond(q, steps), n_perc, len(steps) - n_perc)[2] == err


def test_scripted_judge_noise_one_is_always_wrong_and_deterministic():
    j = ScriptedJudge(noise=1.0, miss_share=0.5, seed=7)
    kinds = set()
    for q in synthetic_questions(12, seed=2):
        for steps, err in _solutions(q):
            fe = j.first_error(q, steps)
            assert fe != err
            assert fe == ScriptedJudge(noise=1.0, miss_share=0.5, seed=7).first_error(q, steps)
            kinds.add("miss" if fe is None else "false_alarm" if err is None else "wrong_step")
    assert kinds == {"miss", "false_alarm", "wrong_step"}


def test_scripted_judge_error_rate_matches_noise():
    j = ScriptedJudge(noise=0.3, seed=0)
    wrong = total = 0
    for q in synthetic_questions(60, seed=4):
        for steps, err in _solutions(q):
            total += 1
            wrong += j.first_error(q, steps) != err
    assert 0.15 < wrong / total < 0.45


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "1" + "]" * 100_000,  # deep arrays: RecursionError in json before
    '{"a":' * 50_000 + "1" + "}" * 50_000,  # deep objects
    "{" * 199_000,  # long run of "{": quadratic before (200k braces: 73 s)
    '{"section": "Reasoning", "index": 0}' + "x" * 200_001,  # over the length bound
    "<conclusion>" * 16_000 + "x" * 4000,  # unclosed tags: quadratic with a lazy regex
    "[Reasoning]\n" + "<analysis_1>" * 16_000 + "<conclusion>Incorrect</conclusion>",
])
def test_parse_judge_output_hostile_is_fast_parse_error(text):
    import time

    t0 = time.perf_counter()
    with pytest.raises(JudgeParseError):
        parse_judge_output(text, 3, 2)
    assert time.perf_counter() - t0 < 2.0


def test_parse_judge_output_verdict_after_deep_nesting_and_braces():
    text = "[" * 5000 + " {{{ {" * 3000 + '\n{"section": "Reasoning", "index": 1}'
    assert parse_judge_output(text, 3, 2) == ("Reasoning", 1, 4)


def test_vlm_judge_counts_hostile_output_as_parse_failure():
    client = FakeClient(['{"a":' * 100_000, '{"section": null, "index": null}'])
    v = VLMJudge(client, max_attempts=2).judge(synthetic_questions(1)[0], _steps())
    assert v.ok and v.first_error is None and v.parse_failures == 1 and v.attempts == 2
