"""The synth config's clients carry a request deadline (issue 12, item 8): a judge call is bounded by
``judge.max_attempts x judge.deadline`` (9 minutes by default), not ~30 minutes."""
import pytest

from jaxprm.config import ConfigError
from jaxprm.synth.config import base_config, validate_synth_config
from jaxprm.synth.run import make_client


def test_built_clients_get_the_configured_deadline():
    c = base_config()
    assert c.judge.max_attempts * c.judge.deadline <= 600
    assert make_client(c.judge, "JUDGE_API_KEY").deadline == 180.0
    c.policy.deadline = 42.5
    assert make_client(c.policy, "OPENAI_API_KEY").deadline == 42.5


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_deadline_must_be_positive(bad):
    c = base_config()
    c.judge.kind = "openai"
    c.judge.deadline = bad
    with pytest.raises(ConfigError, match=r"judge\.deadline must be a number of seconds > 0"):
        validate_synth_config(c)
