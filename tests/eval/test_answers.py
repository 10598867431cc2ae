"""``jaxprm.eval.answers`` keeps the names eval and its users import; the code lives in ``jaxprm.data``
(tested in tests/data/test_answers.py, test_benchmarks.py and test_solution.py)."""
from jaxprm.data import answers, solution
from jaxprm.data.formats import benchmarks
from jaxprm.eval import answers as eval_answers


def test_eval_answers_reexports_the_one_implementation():
    for name in eval_answers.__all__:
        owner = next(m for m in (answers, benchmarks, solution) if name in vars(m))
        assert getattr(eval_answers, name) is getattr(owner, name), name
