"""The three grading modes (issue 18): regression tests for the lenient matcher's bugs, the
``vlprm`` check, the pluggable MathVista extractor / VL-PRM judge on an OpenAI-compatible server,
and ``python -m jaxprm.eval bon --match``."""
import json

import pytest

from jaxprm.data.answers import Grader, extract_choice, extract_answer, grade, is_correct
from jaxprm.eval.answers import openai_text_fn

from tests.fake_openai import FakeOpenAIServer

# ----------------------------------------------------------------------------- lenient bugs


@pytest.mark.parametrize("pred, gold", [("10001", "10000"), ("527.9", "527.89"), ("7.68541e+09", "7685413092")])
def test_lenient_has_no_relative_tolerance(pred, gold):
    assert not is_correct(pred, gold)
    for bench in ("mmmu", "mathvista", "mathvision", "puzzlevqa"):
        assert not is_correct(pred, gold, benchmark=bench)


def test_lenient_small_differences():
    assert not is_correct("12.0001", "12")                          # was accepted by the 1e-4 tolerance
    assert not is_correct("12.0001", "12", benchmark="puzzlevqa")
    assert is_correct("12.0001", "12", benchmark="mmmu")            # MMMU rounds both to 2 decimals


def test_lenient_rounds_only_where_the_benchmark_rule_does():
    assert not is_correct("0.33", "0.3", benchmark="mmmu")       # MMMU: both at 2 decimals, 0.33 != 0.30
    assert is_correct("0.334", "0.33", benchmark="mmmu")
    assert is_correct("1.449", "1.45", benchmark="mathvista")    # MathVista: the gold's precision
    assert not is_correct("1.449", "1.45", benchmark="puzzlevqa")
    assert is_correct("3.142", "3.14", benchmark="mathvision")   # MATH-V: round(., 2) both sides
    assert not is_correct("3.43", "24/7", benchmark="mathvista")  # fraction-gold rule is generic-only
    assert is_correct("3.43", "24/7", benchmark="mmmu")           # (MMMU: both sides at 2 decimals)
    assert is_correct("3.43", "24/7")
    assert is_correct("100.5", "100", rel_tol=0.01)              # tolerance only when asked for


def test_lenient_option_text_does_not_find_2_inside_2_5():
    choices = ["1", "2", "2.5", "3"]
    assert extract_choice("EF is 2.5", choices) == "C"
    assert not is_correct("EF is 2.5", "2", choices)
    assert is_correct("EF is 2.5", "2.5", choices)
    # of two text options ending at the same place, the longer (more specific) one wins
    assert extract_choice("it is the red car", ["car", "red car"]) == "B"
    assert extract_choice("it is the red car", ["red car", "car"]) == "A"


@pytest.mark.parametrize("text, letter", [
    ("It could be A or B, but after checking, B is correct.", "B"),
    ("E\n\nExplanation: the other options fail.", "E"),
    ("(C)\nBecause the area doubles.", "C"),
    ("After checking every option I choose D.", "D"),
    ("A is the correct answer since the sum is 12.", "A"),
])
def test_lenient_finds_a_letter_chosen_in_prose_or_alone_on_the_first_line(text, letter):
    assert extract_choice(text, num_choices=5) == letter
    assert extract_answer(text, choices=list("12345")) == letter


def test_lenient_article_is_not_a_choice():
    assert extract_choice("A triangle is correct here", num_choices=4) is None


# ----------------------------------------------------------------------------- official vs lenient


def test_official_keeps_the_quirks_lenient_fixes():
    p = {"answer": "B", "choices": ["1", "2", "2.5", "3"], "source": "mmmu"}
    # MMMU's substring rule finds "2" inside "2.5" and keeps the first of equal starts
    assert grade("So the length EF is 2.5 in the figure", p).correct
    assert not grade("So the length EF is 2.5 in the figure", p, mode="lenient").correct
    # PuzzleVQA: the last capital A-D anywhere ("Colors"), not the chosen letter
    pz = {"answer": "green", "choices": ["red", "green", "blue", "yellow"], "source": "puzzlevqa"}
    assert not grade("The answer is B because of the Colors", pz).correct
    assert grade("The answer is B because of the Colors", pz, mode="lenient").correct


def test_generic_official_is_lenient():
    g = Grader("official")
    v = g("so \\boxed{4}", {"answer": "4", "choices": None})
    assert v.correct and g.effective_mode() == "lenient" and g.report()["effective_mode"] == "lenient"


def test_unknown_mode_or_benchmark():
    with pytest.raises(ValueError, match="unknown match mode"):
        Grader("strict")
    with pytest.raises(ValueError, match="unknown benchmark"):
        Grader("official", "gsm8k")


# ----------------------------------------------------------------------------- vlprm


def test_vlprm_boxed_first_and_per_benchmark_branch():
    mc = {"answer": "dog", "choices": ["cat", "dog"], "answer_letter": "B", "source": "puzzlevqa"}
    g = Grader("vlprm")
    assert g("... (A) looks right but \\boxed{B}", mc).correct          # boxed beats PuzzleVQA's last (X)
    assert not g("... \\boxed{A}", mc).correct
    v = g("the dog, clearly", mc)                                       # no box, long: needs the judge
    assert not v.correct and v.status == "unparseable" and v.route == "unjudged"
    num = {"answer": "12", "choices": None, "source": "mathvista"}
    assert grade("so \\boxed{12.0}", num, mode="vlprm").correct           # numeric gold: math-verify-like
    assert grade("so \\boxed{\\frac{24}{2}}", num, mode="vlprm").correct
    txt = {"answer": "Paris", "choices": None, "source": "mmmu", "meta": {"question_type": "open"}}
    assert grade("\\boxed{paris}", txt, mode="vlprm").correct           # case-insensitive, whole string
    assert not grade("\\boxed{Paris, France}", txt, mode="vlprm").correct
    mv = {"answer": "C", "choices": ["1", "2", "3/4", "4", "5"], "source": "mathvision"}
    assert grade("\\boxed{0.75}", mv, mode="vlprm").correct             # MATH-V is_equal on the option text


def test_vlprm_judge_on_an_openai_compatible_server():
    def reply(body):
        prompt = body["messages"][0]["content"]
        return ["B" if "the dog, clearly" in prompt else "Z"]

    mc = {"question": "Which animal", "answer": "dog", "choices": ["cat", "dog"], "answer_letter": "B",
          "source": "puzzlevqa"}
    with FakeOpenAIServer(reply) as srv:
        judge = openai_text_fn(srv.base_url, "judge-model", api_key="", max_retries=0)
        g = Grader("vlprm", judge=judge)
        v = g("the dog, clearly", mc)
        assert v.correct and v.route == "judge" and v.pred == "B"
        assert not g("a spider", mc).correct
        body = srv.bodies[0]
        assert body["model"] == "judge-model" and body["temperature"] == 0
        assert "Options: A. cat B. dog" in body["messages"][0]["content"]
    assert g.report()["routes"] == {"judge": 2}


# ----------------------------------------------------------------------------- MathVista extractor


def test_mathvista_llm_extractor_and_rule_stand_in():
    prob = {"question": "How long?", "answer": "1.45", "choices": None, "source": "mathvista",
            "meta": {"question_type": "free_form", "answer_type": "float", "precision": 2,
                     "query": "Hint: two decimals.\nQuestion: How long?"}}
    resp = "Measuring the bar, it is about 1.449 metres long."
    with FakeOpenAIServer(lambda body: ["1.449"]) as srv:
        g = Grader("official", "mathvista", extractor=openai_text_fn(srv.base_url, "ext", api_key="", max_retries=0))
        v = g(resp, prob)
        sent = srv.bodies[0]["messages"][0]["content"]
    assert v.correct and v.route == "llm" and v.pred == "1.45"
    assert sent.startswith("Please read the following example.")
    assert sent.endswith("Hint: two decimals.\nQuestion: How long?\n\n" + resp + "\n\nExtracted answer: ")
    # no extractor: the rule-based stand-in, counted as such
    v2 = Grader("official", "mathvista")(resp, prob)
    assert v2.route == "rules" and v2.correct
    # a failing extractor: the official code extracts "" (never correct)
    def broken(prompt):
        raise RuntimeError("down")
    v3 = Grader("official", "mathvista", extractor=broken)(resp, prob)
    assert v3.route == "llm_error" and not v3.correct and v3.status == "unparseable"
    # a pre-extracted answer is used as given
    v4 = Grader("official", "mathvista")(resp, prob, extraction="1.451")
    assert v4.route == "pre" and v4.correct


def test_mathvista_empty_multiple_choice_extraction_is_a_counted_guess():
    prob = {"answer": "tiny", "choices": ["large", "small", "tiny"], "source": "mathvista",
            "meta": {"question_type": "multi_choice", "answer_type": "text"}}
    g = Grader("official", "mathvista")
    v = g("", prob)
    assert v.correct and v.status == "guess" and g.report()["guesses"] == 1


# ----------------------------------------------------------------------------- CLI


def _bench_files(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    rows = [{"id": "m1", "question": "Length?", "options": ["1", "2", "2.5", "3"], "answer": "B",
             "question_type": "multiple-choice", "image_1": "img/a.png"},
            {"id": "m2", "question": "Which?", "options": ["cat", "dog"], "answer": "A",
             "question_type": "multiple-choice", "image_1": "img/a.png"}]
    (tmp_path / "mmmu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cands = [{"id": "m1", "candidates": ["So the length EF is 2.5 in the figure [p=0.9]", "\\boxed{C} [p=0.2]"]},
             {"id": "m2", "candidates": ["hmm [p=0.5]", "The answer is (A). [p=0.4]"]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cands))
    return str(tmp_path / "mmmu.jsonl"), str(tmp_path / "c.jsonl")


@pytest.mark.parametrize("match", ["official", "vlprm", "lenient"])
def test_bon_cli_match_modes(tmp_path, capsys, match):
    from jaxprm.eval.run import main
    from tests.fakes import TagPRM

    data, cands = _bench_files(tmp_path)
    out = tmp_path / "out"
    argv = ["bon", "--prm", "fake", "--data", data, "--format", "mmmu", "--candidates", cands, "--max-n", "2",
            "--aggregate", "mean", "--out", str(out), "--no-progress"]
    if match != "official":
        argv += ["--match", match]
    assert main(argv, prm=TagPRM()) == 0
    res = json.loads((out / "bon_results.json").read_text())
    printed = capsys.readouterr().out
    assert res["match"] == match and res["match_effective"] == [match]
    assert set(res["answers"]) == {"official", "vlprm", "lenient"}
    assert not res["answers"][match].get("rules_only")
    rep = res["answers"]["official"]
    # official: m1 c0 "2.5" -> MMMU substring quirk picks B (gold) ; m1 c1 "\boxed{C}" -> no "(C)", no " C " -> 6 words? no -> guess;
    # m2 c0 "hmm" -> guess ; m2 c1 "(A)" -> A
    assert rep["guesses"] == 2 and rep["n"] == 4
    correct = [p["correct"] for p in res["per_problem"]]
    if match == "official":
        assert correct[0][0] is True and correct[1][1] is True
    if match == "lenient":
        assert correct == [[False, False], [False, True]]
    if match == "vlprm":
        assert correct == [[False, False], [False, False]]  # no \boxed{B}/{A} anywhere; m2 "(A)" is not boxed
    assert f"answers [{match}]" in printed and "fallback guesses" in printed and "unparseable" in printed
    assert (out / "bon_curve.png").stat().st_size > 0


def test_bon_cli_judge_flags_go_together(tmp_path, capsys):
    from jaxprm.eval.run import main
    from tests.fakes import TagPRM

    data, cands = _bench_files(tmp_path)
    rc = main(["bon", "--prm", "fake", "--data", data, "--format", "mmmu", "--candidates", cands, "--max-n", "2",
               "--out", str(tmp_path / "o"), "--judge-model", "x", "--no-progress"], prm=TagPRM())
    assert rc == 2 and "--judge-base-url and --judge-model go together" in capsys.readouterr().err


def test_plot_title_names_the_mode(tmp_path, monkeypatch):
    from jaxprm.eval import run
    from tests.fakes import TagPRM

    titles = []
    real = run.bon_lib.plot_bon_curve
    monkeypatch.setattr(run.bon_lib, "plot_bon_curve", lambda c, p, title=None, **k: titles.append(title) or real(c, p, title=title, **k))
    data, cands = _bench_files(tmp_path)
    run.main(["bon", "--prm", "fake", "--data", data, "--format", "mmmu", "--candidates", cands, "--max-n", "2",
              "--aggregate", "mean", "--out", str(tmp_path / "o"), "--no-progress", "--match", "vlprm"], prm=TagPRM())
    assert titles and "match: vlprm" in titles[0]
