"""Answer extraction and matching (``jaxprm.data.answers``)."""
import pytest

from jaxprm.data.answers import (
    clean_answer,
    extract_answer,
    extract_choice,
    extract_number,
    is_correct,
    normalize_text,
    parse_number,
)

# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "s, expected",
    [
        ("42", 42.0),
        ("-7", -7.0),
        ("\u22127", -7.0),
        ("3.25", 3.25),
        (".5", 0.5),
        ("1,000", 1000.0),
        ("12,345,678.5", 12345678.5),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        (r"\frac{3}{4}", 0.75),
        (r"\dfrac{1}{8}", 0.125),
        (r"-\frac{1}{2}", -0.5),
        (r"\frac{-1}{2}", -0.5),
        (r"\frac34", 0.75),
        ("50%", 50.0),
        (r"12.5\%", 12.5),
        ("2.5e3", 2500.0),
        ("$5$", 5.0),
        ("(3/4)", 0.75),
        (r"1\,000", 1000.0),
        ("1{,}000", 1000.0),
        ("90^\\circ", 90.0),
        ("90°", 90.0),
        ("12 cm", None),
        ("abc", None),
        ("1/0", None),
        ("", None),
    ],
)
def test_parse_number(s, expected):
    got = parse_number(s)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_parse_number_non_strings():
    assert parse_number(3) == 3.0
    assert parse_number(2.5) == 2.5
    assert parse_number(True) is None


def test_extract_number_last_and_first():
    assert extract_number("first 3 then 4, finally 5.") == 5.0
    assert extract_number("first 3 then 4", which="first") == 3.0
    assert extract_number("total: 1,234 apples") == 1234.0
    assert extract_number("x2 and H2O") is None  # digits glued to words are not numbers
    assert extract_number("5 - 3 = 2") == 2.0
    assert extract_number("value is -0.25") == -0.25
    assert extract_number("nothing") is None


# ----------------------------------------------------------------------------- choices


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(B)", "B"),
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("Answer: B", "B"),
        ("Answer: (C)", "C"),
        ("answer: [D]", "D"),
        ("The answer is B.", "B"),
        ("the answer is b.", "B"),
        ("The correct answer is (A) because of the area.", "A"),
        ("The correct option is D because it is the largest", "D"),
        ("So the final answer is option C", "C"),
        ("**Answer:** **B**", "B"),
        ("Looking at (A) and (B), the pattern suggests (C).", "C"),
        ("B. 12 cm", "B"),
        (r"Thus \boxed{C}", "C"),
        (r"Thus $\boxed{\text{(D)}}$", "D"),
        (r"\boxed{B. 15}", "B"),
        ("the answer is a triangle", None),  # article, not a letter
        ("answer choices are listed below", None),
        ("The answer is E", None),  # only A-D valid with 4 choices
        ("I cannot tell", None),
        ("", None),
    ],
)
def test_extract_choice_four_options(text, expected):
    assert extract_choice(text, num_choices=4) == expected


def test_extract_choice_matches_option_text():
    choices = ["red", "green", "blue", "yellow"]
    assert extract_choice(r"\boxed{blue}", choices) == "C"
    assert extract_choice("At first it looks red, but it is actually green.", choices) == "B"
    assert extract_choice("The colour is Yellow", choices) == "D"
    # numbers as option text are matched as whole numbers
    assert extract_choice(r"\boxed{12}", ["10", "12", "14"]) == "B"
    assert extract_choice("So the count is 3", ["1", "2", "3", "13"]) == "C"


def test_extract_choice_letter_beats_option_text():
    assert extract_choice("red is wrong; the answer is (B)", ["red", "green"]) == "B"


# ----------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    "text, kind, choices, expected",
    [
        (r"... so the area is \boxed{12 \text{ cm}^2}", "boxed", None, "12 cm^2"),
        (r"\boxed{\dfrac{1}{2}}", "boxed", None, "1/2"),
        ("no box", "boxed", None, None),
        (r"\boxed{\frac{3}{4}}", "number", None, "0.75"),
        (r"\boxed{12 \text{ cm}}", "number", None, "12"),
        (r"\boxed{x = -5}", "number", None, "-5"),
        ("The answer is 1,000 apples.", "number", None, "1000"),
        ("It rose by 50% overall", "number", None, "50%"),
        ("We get 3 then 4 so 7", "number", None, "7"),
        ("The answer is 3.5 cm. Then we check 2.", "number", None, "3.5"),
        ("nothing numeric", "number", None, None),
        ("Answer: (B)", "choice", None, "B"),
        ("The answer is (B).", "auto", None, "B"),
        (r"so $\boxed{42}$", "auto", None, "42"),
        (r"\boxed{\text{Paris}}", "auto", None, "Paris"),
        ("Final answer: $\\dfrac{1}{2}$", "auto", None, "1/2"),
        ("The answer is 3.5 cm. Then", "auto", None, "3.5 cm"),
        ("so the answer is B, i.e. 12", "auto", None, "B"),
        ("(A) foo (B) bar... so (D)", "auto", None, "D"),
        ("the total is 17 and the rest 4", "auto", None, "4"),
        ("no answer at all", "auto", None, None),
        ("I pick green.", "auto", ["red", "green"], "B"),
        (r"\boxed{2}", "auto", ["1", "2", "3"], "B"),
        (r"\boxed{7}", "auto", ["1", "2", "3"], "7"),  # not an option: the raw answer
    ],
)
def test_extract_answer(text, kind, choices, expected):
    assert extract_answer(text, kind=kind, choices=choices) == expected


def test_extract_answer_errors_and_none():
    with pytest.raises(ValueError, match="unknown kind"):
        extract_answer("x", kind="letters")
    assert extract_answer(None) is None


def test_clean_and_normalize():
    assert clean_answer(r"$\text{Yes}$.") == "Yes"
    assert clean_answer(r"\left( 1, 2 \right)") == "( 1, 2 )"
    assert normalize_text("  The  Cat. ") == "the cat"
    assert normalize_text("(b)") == "b"
    assert normalize_text('"yes"') == "yes"


# ----------------------------------------------------------------------------- is_correct


@pytest.mark.parametrize(
    "pred, gold, choices, expected",
    [
        # strings
        ("Paris", "paris", None, True),
        ("  New   York ", "new york", None, True),
        ("Yes.", "yes", None, True),
        ("London", "Paris", None, False),
        ("", "Paris", None, False),
        (None, "Paris", None, False),
        # numbers
        ("1000", "1,000", None, True),
        ("1,000", "1000", None, True),
        ("0.75", "3/4", None, True),
        (r"\frac{3}{4}", "0.75", None, True),
        ("-2", "-2.0", None, True),
        ("2", "-2", None, False),
        ("1/3", "0.33", None, True),  # rounds to the gold's 2 decimals
        ("0.334", "0.33", None, True),
        ("0.336", "0.33", None, False),
        ("3.14159", "3.1416", None, True),
        ("3.2", "3", None, False),
        ("12 cm", "12", None, True),
        ("about 12.0001", "12", None, False),  # no relative tolerance (issue 18)
        ("12.01", "12", None, False),
        ("50%", "50", None, True),
        ("50%", "0.5", None, True),
        ("0.5", "50%", None, True),
        ("5e-3", "0.005", None, True),
        ("seven", "7", None, False),
        # letters without choices
        ("(B)", "B", None, True),
        ("b", "B", None, True),
        ("B. 12 cm", "B", None, True),
        ("C", "B", None, False),
        # multiple choice: gold letter, prediction letter or option text
        ("B", "B", ["3", "5", "7"], True),
        ("5", "B", ["3", "5", "7"], True),
        ("5.0", "B", ["3", "5", "7"], True),
        ("7", "B", ["3", "5", "7"], False),
        ("(b)", "B", ["3", "5", "7"], True),
        # multiple choice: gold option text (MathVista, PuzzleVQA)
        ("C", "blue", ["red", "green", "blue"], True),
        ("blue", "blue", ["red", "green", "blue"], True),
        ("Blue", "blue", ["red", "green", "blue"], True),
        ("A", "blue", ["red", "green", "blue"], False),
        ("The answer is (C) blue", "blue", ["red", "green", "blue"], True),
        ("C", "12", ["10", "11", "12"], True),
        ("B", "12", ["10", "11", "12"], False),
        # gold text that is also a letter-looking option: the text match wins for gold
        ("A", "B", ["B", "A"], True),
        # list of accepted answers (MMMU open)
        ("3.429", ["24/7", "3.429"], None, True),
        ("3.43", ["24/7"], None, True),
        ("4", ["24/7", "3.429"], None, False),
    ],
)
def test_is_correct(pred, gold, choices, expected):
    assert is_correct(pred, gold, choices=choices) is expected


def test_is_correct_tolerances():
    assert not is_correct("100.5", "100")
    assert is_correct("100.5", "100", rel_tol=0.01)
    assert is_correct("0.0000001", "0", abs_tol=1e-6)
    assert not is_correct("0.001", "0", abs_tol=1e-6)


def test_is_correct_numeric_gold_types():
    assert is_correct("3", 3)
    assert is_correct("2.50", 2.5)


def test_fraction_gold_vs_rounded_prediction():
    assert is_correct("3.43", "24/7")
    assert is_correct("3.429", "24/7")
    assert not is_correct("3.4", "24/7")  # one decimal is too coarse
    assert not is_correct("3.44", "24/7")
