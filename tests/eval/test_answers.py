"""``jaxprm.eval.answers`` keeps the names eval and its users import; the code lives in ``jaxprm.data``
(tested in tests/data/test_answers.py, test_benchmarks.py and test_solution.py) and the graders'
rules in ``jaxprm.data.answer_rules`` (tests/eval/test_official_rules.py, the golden corpus)."""
from jaxprm.data import answers, solution
from jaxprm.data.formats import benchmarks
from jaxprm.eval import answers as eval_answers


def test_eval_answers_reexports_the_one_implementation():
    for name in eval_answers.__all__:
        if name == "openai_text_fn":  # eval's own: it needs jaxprm.search's client
            continue
        owner = next(m for m in (answers, benchmarks, solution) if name in vars(m))
        assert getattr(eval_answers, name) is getattr(owner, name), name


def test_graders_are_reexported():
    for name in ("Grader", "Verdict", "grade", "MATCH_MODES", "BENCHMARKS", "MMMU_SEED"):
        assert getattr(eval_answers, name) is getattr(answers, name)
    assert eval_answers.MATCH_MODES == ("official", "vlprm", "lenient")
