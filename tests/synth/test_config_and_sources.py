"""Config overrides, the jsonl question source, and the OpenAI policy's request shapes."""
import base64
import json
from pathlib import Path

import pytest

from jaxprm.config import ConfigError
from jaxprm.data import synthetic as S
from jaxprm.synth import format as F
from jaxprm.synth.__main__ import parse_args
from jaxprm.synth.config import base_config, validate_synth_config
from jaxprm.synth.policies import GenRequest, OpenAIRolloutPolicy
from jaxprm.synth.questions import Question, parse_shard, select_shard, synthetic_questions
from jaxprm.synth.run import ShardStore, run

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synth_tiny.py")


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_overrides_are_typed(capsys):
    c, out, shard, _ = parse_args(["--out", "x", "--config", CONFIG, "--config.mc.num_continuations=8",
                                   "--config.judge.noise", "0.5", "--config.mc.early_stop=true",
                                   "--config.synthetic.image_size=(84, 84)", "--config.policy.model=a=b"])
    assert out == "x" and shard == (0, 1)
    assert c.mc.num_continuations == 8 and c.judge.noise == 0.5 and c.mc.early_stop is True
    assert c.synthetic.image_size == (84, 84) and c.policy.model == "a=b"
    assert c.seed == 0 and c.judge.noise != base_config().judge.noise  # the rest from the file
    err = _usage_error(capsys, ["--out", "x", "--config", CONFIG, "--config.mc.num_continuations=lots"])
    assert "--config.mc.num_continuations" in err and "lots" in err
    assert "early_stop" in _usage_error(capsys, ["--out", "x", "--config", CONFIG, "--config.mc.early_stop=maybe"])
    # every override naming no field, with what is there
    err = _usage_error(capsys, ["--out", "x", "--config", CONFIG, "--config.mc.nope=1", "--config.mc.num_continuationz=2"])
    assert "--config.mc.nope: config.mc has no field 'nope'; fields there: chunk, early_stop, num_continuations" in err
    assert "did you mean --config.mc.num_continuations?" in err
    assert "--config.mc" in _usage_error(capsys, ["--out", "x", "--config", CONFIG, "--config.mc=1"])  # a group
    assert "--config.seed" in _usage_error(capsys, ["--out", "x", "--config", CONFIG, "--config.seed"])
    assert "config file not found" in _usage_error(capsys, ["--out", "x", "--config", "no_such_config.py"])
    assert "--out" in _usage_error(capsys, ["--config", CONFIG])


def test_invalid_values_are_listed_together(capsys, tmp_path):
    c = base_config()
    c.policy.kind, c.labels.primary, c.source = "human", "majority", "jsonl"
    with pytest.raises(ConfigError) as e:
        validate_synth_config(c)
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 3, problems
    assert "policy.kind" in problems[1] and "labels.primary" in problems[2] and "input.path" in problems[0]
    with pytest.raises(ConfigError, match="policy.kind"):  # run() checks too, before any work
        run(c, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    err = _usage_error(capsys, ["--out", str(tmp_path), "--config", CONFIG, "--config.judge.kind=oracle",
                                "--config.ground_truth=maybe"])
    assert err.startswith("invalid config:") and "judge.kind" in err and "ground_truth" in err


def test_shard_helpers():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    qs = synthetic_questions(20)
    parts = [select_shard(qs, i, 3) for i in range(3)]
    assert sorted(q.id for p in parts for q in p) == sorted(q.id for q in qs)


class AnswerPolicy:
    """Writes a one-step solution boxing ``answer``; continuations box it too."""

    name = "answer"

    def __init__(self, answer):
        self.answer = answer

    def usage_snapshot(self):
        return {}

    def generate(self, requests):
        out = []
        for r in requests:
            if r.prefix is None:
                out.append([F.render_solution(["I see it."], ["So it is that."], self.answer)] * r.n)
            else:
                out.append([f"\n<correct_answer>$\\boxed{{{self.answer}}}$</correct_answer>"] * r.n)
        return out


def test_jsonl_source_multiple_choice(tmp_path):
    img = S.encode_png(S.render([], (2, 2), (56, 56)))
    (tmp_path / "a.png").write_bytes(img)
    rows = [
        {"id": "q1", "question": "Which colour?", "choices": ["red", "blue"], "answer": "blue", "image": "a.png"},
        {"id": "q2", "question": "How many?", "answer": "3", "image": {"bytes": base64.b64encode(img).decode()}},
    ]
    path = tmp_path / "qs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = base_config()
    c.source = "jsonl"
    c.input.path = str(path)
    c.num_questions = 0
    c.judge.kind = "none"
    c.mc.num_continuations = 2
    c.progress = False
    c.labels.primary = "mc"
    stats = run(c, str(tmp_path / "out"), policy=AnswerPolicy("B"))
    recs = {r.id: r for r in ShardStore(str(tmp_path / "out")).read_records()}
    assert stats["complete"] and "report" not in stats
    r1, r2 = recs["q1-r0"], recs["q2-r0"]
    assert r1.meta["answer_correct"] and r1.labels == [1, 1]  # "B" is the letter of "blue"
    assert r1.images == [str(tmp_path / "a.png")] and r1.meta["choices"] == ["red", "blue"]
    assert not r2.meta["answer_correct"] and r2.labels == [0, 0] and isinstance(r2.images[0], bytes)
    assert r1.meta["judge"] is None and r1.meta["consensus"] == "no_judge"
    assert r1.source == "synth/generic"


class FakeClient:
    def __init__(self):
        self.calls = []

    def chat(self, messages, n=1, **kw):
        self.calls.append((messages, n, kw))
        return [f"out{i}" for i in range(max(1, n - 1))]  # a server that returns one choice too few


def test_openai_policy_requests():
    q = Question("q", "How many?", "2", images=[S.encode_png(S.render([], (2, 2), (56, 56)))])
    client = FakeClient()
    pol = OpenAIRolloutPolicy(client, n_per_request=3, max_workers=1, send_seed=True)
    outs = pol.generate([GenRequest(q, 5, prefix="[Visual Elements]\n<step_1>\nx\n</step_1>", tag="mc"),
                         GenRequest(q, 1)])
    assert [len(o) for o in outs] == [5, 1]
    ns = [n for _, n, _ in client.calls]
    assert sum(1 for n in ns if n == 3) == 1 and sum(ns) > 6  # split into 3 + 2, topped up when short
    msgs, _, kw = client.calls[0]
    assert msgs[-1] == {"role": "assistant", "content": "[Visual Elements]\n<step_1>\nx\n</step_1>"}
    assert kw["continue_final_message"] is True and kw["add_generation_prompt"] is False
    assert isinstance(kw["seed"], int)
    user = msgs[0]["content"]
    assert user[0]["type"] == "image_url" and "<question>\nHow many?\n</question>" in user[-1]["text"]
    # without a prefix: no assistant message, no continuation flags
    msgs, _, kw = client.calls[-1]
    assert msgs[-1]["role"] == "user" and "continue_final_message" not in kw

    pol = OpenAIRolloutPolicy(FakeClient(), prefix_mode="user_instruction")
    msgs, extra = pol.messages(GenRequest(q, 1, prefix="[Visual Elements]\n<step_1>\nx\n</step_1>"))
    assert len(msgs) == 1 and "Continue it" in msgs[0]["content"][-1]["text"] and extra == {}
    pol = OpenAIRolloutPolicy(FakeClient(), prefix_mode="assistant_message")
    msgs, extra = pol.messages(GenRequest(q, 1, prefix="P"))
    assert msgs[-1] == {"role": "assistant", "content": "P"} and extra == {}
    with pytest.raises(ValueError):
        OpenAIRolloutPolicy(FakeClient(), prefix_mode="nope")


def test_judge_key_comes_only_from_its_own_variable(monkeypatch):
    from jaxprm.synth.run import build_judge, build_policy

    monkeypatch.setenv("OPENAI_API_KEY", "sk-policy")
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    c = base_config()
    c.judge.kind = c.policy.kind = "openai"
    c.judge.base_url = c.policy.base_url = "http://127.0.0.1:9/v1"
    assert build_judge(c).client.api_key == ""  # never the policy's key
    assert build_policy(c).client.api_key == "sk-policy"
    monkeypatch.setenv("JUDGE_API_KEY", "sk-judge")
    assert build_judge(c).client.api_key == "sk-judge"
