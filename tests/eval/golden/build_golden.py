"""Builds the golden corpus in this folder (run once by hand; the tests only read the .jsonl files).

Nothing here imports jaxprm: every expectation is either
- written by hand from the official rule (each template below states the letter / answer the
  official parser picks and why), expanded over gold answers so that the verdict follows by
  construction (``expected = parsed == gold``), or
- the verdict the official scripts themselves recorded in their repositories' published outputs:
  MathVista ``results/*/output_*.json`` (``extraction`` -> ``true_false``, computed by
  ``calculate_score.py``) and MATH-V ``outputs/**.jsonl`` (``response`` -> ``model_answer``,
  ``correct``, computed by ``evaluation/evaluate.py``).

Usage: python tests/eval/golden/build_golden.py MATHVISTA_RESULTS_DIR MATHV_REPO_DIR
(MATHVISTA_RESULTS_DIR holds output_bard.json, output_chatgpt.json, output_chatgpt_2shot_solution.json;
MATHV_REPO_DIR holds data/test.jsonl and the two outputs files named below).
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
L4 = "ABCD"


def write(name, rows):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(name, len(rows))


# ----------------------------------------------------------------------------- MMMU
# (response, parsed letter) for 4 options ["12 cm", "15 cm", "18 cm", "21 cm"]; the letter is what
# parse_multi_choice_response returns, reasoned from eval_utils.py.
OPTS = ["12 cm", "15 cm", "18 cm", "21 cm"]
MMMU_MC = [
    ("(A)", "A"), ("(B)", "B"), ("(C)", "C"), ("(D)", "D"),
    ("The answer is (B).", "B"),                                  # bracket
    ("Between (A) and (C), I pick (C).", "C"),                    # several brackets: last rfind
    ("(C) is wrong, so the answer is (A)", "A"),                  # last "(X)"
    ("(D) fits best; (B) does not.", "B"),                        # last "(X)" even if rejected
    ("A", "A"), ("B.", "B"), ("C!", "C"), ("'D'", "D"),           # stripped punctuation, then " X "
    ("B,", "B"), ("Answer: C", "C"),                              # " C " after padding
    ("Answer: B.", "B"),                                          # trailing "." stripped once
    ("I think A is right but D is better", "D"),                  # " A " and " D ": last rfind
    ("It is C or B", "B"),                                        # last of " C ", " B "
    ("A. 12 cm", "A"),                                            # no " A " (A.), >5 words? no: 3 words -> guess? see below
]
# "A. 12 cm": no "(X)", no " X " (the A is followed by "."), 3 words -> random guess (not here)
MMMU_MC = MMMU_MC[:-1]
MMMU_MC += [
    ("After measuring the diagram carefully the side is 15 cm long", "B"),   # content, >5 words
    ("The first guess was 12 cm but the real length is 18 cm overall", "C"),  # content: last rfind
    ("Measuring again, it is clearly 21 cm and not 12 cm at all", "A"),      # last occurrence is 12 cm
    ("the length of the side is 18 CM in this figure", "C"),                 # case-insensitive
    ("b) the answer is b", None),                                           # lowercase: no candidate, >5 words, no option text -> guess
]
# substring quirk: options ["1", "2", "2.5", "3"], response "EF is 2.5 units long in total" -> "2"
# and "2.5" both occur; rfind("2") == rfind("2.5")? "2.5": rfind("2")=start of "2.5"? the last "2" is
# the one in "2.5" -> equal starts -> argmax keeps the first candidate, "2" (B).
MMMU_SUBSTR = [
    ("EF is 2.5 units long in total", ["1", "2", "2.5", "3"], "B"),
    ("the segment EF measures 2.5 in the end", ["1", "2", "2.5", "3"], "B"),
    ("so the ratio must be 3 to 1 overall", ["1", "2", "2.5", "3"], "A"),  # "3"@.., "1"@later -> A (1 is last)
    ("we count 13 apples on the table today", ["3", "13", "30", "31"], "A"),  # "3" rfind == "13"+1 > "13" start -> A
]
# open questions: (response, gold, expected) from parse_open_response + eval_open
MMMU_OPEN = [
    ("The answer is 3.14159", "3.14", True),       # 3.14159 -> round 2 -> 3.14
    ("The answer is 3.146", "3.14", False),        # -> 3.15
    ("so the value is 0.33", "0.3", False),        # 0.33 vs 0.3
    ("so the value is 0.30", "0.3", True),
    ("Therefore the total is 1,000", "1000", True),
    ("Therefore the total is 10001", "10000", False),
    ("Thus the speed is 527.9 m/s", "527.89", False),   # 527.9 vs 527.89
    ("Thus the speed is 527.894 m/s", "527.89", True),
    ("The result is 7685413092", "7685413092", True),
    ("The result is 7.68541e+09", "7685413092", False),
    ("so it is a parallelogram", "parallelogram", True),       # substring
    ("so it is a parallelograms", "parallelogram", True),      # substring quirk
    ("so it is a square", "parallelogram", False),
    ("The final answer is Paris, France", "paris", True),
    ("The answer is b", "b", True),             # one-char pred "b" is normalised to " b"/"b " too, so " b" is in it
    ("The answer is option b here", "b", True),  # "option b here" contains " b"
    ("x = 24/7", "3.43", False),                 # "24/7" -> numbers 24, 7
    ("the answer is 3.43", ["24/7", "3.429"], True),   # 3.429 -> 3.43
    ("the answer is 3.4", ["24/7", "3.429"], False),
    ("Area = 12", "12", True),                  # '=' on the last line
    ("12", "12.0", True),
    ("The answer is twelve", "12", False),
]


def mmmu_rows():
    rows = []
    for resp, letter in MMMU_MC:
        # the letter templates (all but the option-text ones) parse the same with other options
        sets = [OPTS] if any(o in resp.lower() for o in OPTS) else [OPTS, ["red", "green", "blue", "yellow"]]
        for opts in sets:
            for gold in L4:
                rows.append({"kind": "mc", "response": resp, "options": opts, "answer": gold,
                             "expected_pred": letter, "expected": (letter == gold) if letter else None})
    for resp, opts, letter in MMMU_SUBSTR:
        for gold in L4:
            rows.append({"kind": "mc", "response": resp, "options": opts, "answer": gold,
                         "expected_pred": letter, "expected": letter == gold})
    for resp, gold, exp in MMMU_OPEN:
        rows.append({"kind": "open", "response": resp, "answer": gold, "expected": exp})
    # random fallback: responses with no candidate, graded in this order by one grader; the guesses
    # are random.seed(42) + random.choice as eval_utils.py draws them
    rng = random.Random(42)
    for i in range(80):
        letters = list(L4[: 2 + i % 3])
        guess = rng.choice(letters)
        gold = letters[i % len(letters)]
        rows.append({"kind": "mc_guess", "seq": i, "response": "I am not sure.", "options": OPTS[: len(letters)],
                     "answer": gold, "expected_pred": guess, "expected": guess == gold})
    return rows


# ----------------------------------------------------------------------------- PuzzleVQA
# (response, parsed letter): the last "(X)", else the last capital A-D anywhere.
PUZZLE = [
    ("The answer is (B).", "B"),
    ("(A) is tempting but (C) is right", "C"),
    ("Options (A), (B), (C) and (D) were considered; final: (D)", "D"),
    ("I choose B", "B"),
    ("The answer is B because of the Colors", "C"),   # capital C in "Colors" is last
    ("Based on the pattern, the answer is the third one", "B"),  # B of "Based"
    ("All shapes follow the rule.", "A"),             # A of "All"
    ("the missing one is c", None),                   # no capital A-D, no "(X)"
    ("Answer: (B) large. Double-check: D is not possible", "B"),  # bracket wins over later capital
    ("\\boxed{C}", "C"),
    ("so the final answer is (d)", "D_lower"),         # "(d)" is not "(D)"; then the capital D? none -> see below
]
PUZZLE = [p for p in PUZZLE if p[1] != "D_lower"] + [("so the final answer is (d)", None)]


def puzzle_rows(option_sets):
    rows = []
    for opts in option_sets:
        for resp, letter in PUZZLE:
            for gi, gold in enumerate(opts):
                if letter is None:
                    pred = None
                elif L4.index(letter) < len(opts):
                    pred = opts[L4.index(letter)]
                else:
                    pred = opts[0]  # mapping.get(letter, options[0]): D with 3 options -> first
                rows.append({"response": resp, "options": opts, "answer": gold, "expected_pred": pred,
                             "expected": pred == gold})
    return rows


# ----------------------------------------------------------------------------- MathVista hand cases
MATHVISTA_HAND = [
    # (extraction, question_type, answer_type, precision, choices, answer, expected)
    ("3.9", "free_form", "integer", None, None, "3", True),        # int(float()) truncates
    ("-2.7", "free_form", "integer", None, None, "-2", True),      # toward zero
    ("3", "free_form", "integer", None, None, "3", True),
    ("1,000", "free_form", "integer", None, None, "1000", False),  # float('1,000') fails -> None
    ("10001", "free_form", "integer", None, None, "10000", False),
    ("1.449", "free_form", "float", 2, None, "1.45", True),        # round to precision
    ("1.444", "free_form", "float", 2, None, "1.45", False),
    ("2", "free_form", "float", 1, None, "2.0", True),             # str(round(2.0, 1)) == "2.0"
    ("2", "free_form", "float", 1, None, "2", False),              # "2.0" != "2"
    ("527.9", "free_form", "float", 2, None, "527.89", False),
    ("[2007, 2008]", "free_form", "list", None, None, "[2007, 2008]", True),
    ("[2007,2008]", "free_form", "list", None, None, "[2007, 2008]", False),
    ("B", "multi_choice", "text", None, ["3/11", "8/11", "6/11", "3/5"], "8/11", True),
    ("(b) 8/11", "multi_choice", "text", None, ["3/11", "8/11", "6/11", "3/5"], "8/11", True),  # "(b)" -> B
    ("b", "multi_choice", "text", None, ["3/11", "8/11", "6/11", "3/5"], "8/11", False),  # nearest of "b": "3/5" (distance 3)
    ("8/11", "multi_choice", "text", None, ["3/11", "8/11", "6/11", "3/5"], "8/11", True),
    ("9/11", "multi_choice", "text", None, ["3/11", "8/11", "6/11", "3/5"], "3/11", True),  # distance 1 to 3/11 first
    ("", "multi_choice", "text", None, ["large", "small", "tiny"], "tiny", True),            # empty -> shortest
    ("", "multi_choice", "text", None, ["large", "small", "medium"], "large", True),         # shortest, first on ties
    ("E", "multi_choice", "text", None, ["1", "2", "3", "4"], "1", True),   # E not a valid letter; nearest("E") -> first at distance 1
    ("yes", "multi_choice", "text", None, ["Yes", "No"], "Yes", True),      # distance 1 vs 3
]
# quick extraction (response -> extraction) with the same problem fields
MATHVISTA_QUICK = [
    ("12", "free_form", "integer", None, None, "12", "12", True),
    (" 12 ", "free_form", "integer", None, None, "12", "12", True),      # int() strips
    ("12.0", "free_form", "float", 1, None, "12.0", "12.0", True),
    ("1.45", "free_form", "float", 2, None, "1.45", "1.45", True),
    ('The answer is "7".', "free_form", "integer", None, None, "7", "7", True),
    ('Thinking... The answer is "8/11".', "multi_choice", "text", None, ["3/11", "8/11"], "8/11", "8/11", True),
    ("8/11", "multi_choice", "text", None, ["3/11", "8/11"], "8/11", "8/11", True),
    ("", "free_form", "integer", None, None, "3", "", False),
]


def mathvista_rows(results_dir):
    rows = []
    for ext, qt, at, prec, ch, ans, exp in MATHVISTA_HAND:
        rows.append({"origin": "hand", "extraction": ext, "question_type": qt, "answer_type": at, "precision": prec,
                     "choices": ch, "answer": ans, "expected": exp})
    for resp, qt, at, prec, ch, ans, ext, exp in MATHVISTA_QUICK:
        rows.append({"origin": "hand_quick", "response": resp, "expected_extraction": ext, "question_type": qt,
                     "answer_type": at, "precision": prec, "choices": ch, "answer": ans, "expected": exp})
    for fname in ("output_bard.json", "output_chatgpt.json", "output_chatgpt_2shot_solution.json"):
        d = json.load(open(os.path.join(results_dir, fname)))
        for i, (pid, v) in enumerate(d.items()):
            if i % 10 or "extraction" not in v:
                continue
            rows.append({"origin": f"MathVista results/{fname}#{pid}", "extraction": v["extraction"],
                         "question_type": v["question_type"], "answer_type": v["answer_type"],
                         "precision": v["precision"], "choices": v["choices"], "answer": v["answer"],
                         "expected": bool(v["true_false"])})
    return rows


# ----------------------------------------------------------------------------- MATH-V
MATHV_HAND = [
    # (response, options, gold, expected model_answer, expected verdict)
    ("The answer is C.", [], "C", "c", True),                          # " C." ending -> C, lower-cased
    ("C\nBecause the triangle ...", ["1", "2", "3", "4", "5"], "C", "c", True),
    ("(B)\nbecause", ["1", "2", "3", "4", "5"], "C", "b", False),
    ("So the result is 12.", [], "12", "12", True),
    ("So the result is 12.5.", [], "12.5", "12.5", True),
    ("We get \\boxed{\\frac{3}{4}}", [], "0.75", "\\frac{3}{4}", True),   # value 0.75
    ("We get \\boxed{0.5}", [], "1/2", "\\frac{1}{2}", True),             # "0.5" -> \frac{1}{2}
    ("First \\boxed{2} then \\boxed{3}", [], "3", "3", True),             # last box
    ("the answer is 3.14", [], "\\pi", "3.14", True),                     # round(pi, 2)
    ("the answer is 3.15", [], "\\pi", "3.15", False),
    ("the answer is 10001", [], "10000", "10001", False),
    ("\\boxed{2\\sqrt{3}}", [], "3.46", "2\\sqrt{3}", True),
    ("\\boxed{(1, 2)}", [], "(1,2)", "(1,2)", True),
    ("\\boxed{x = 5}", [], "5", "5", True),                               # after "="
    ("\\boxed{5 \\text{ cm}}", [], "5", "5{cm}", False),                   # spaces, then \\text removed: "5{cm}"
    ("The correct answer is 7\nmore text", [], "7", "7", True),
    ("\\boxed{B}", ["3", "5", "7", "9", "11"], "B", "b", True),
    ("\\boxed{5}", ["3", "5", "7", "9", "11"], "B", "5", True),           # equals the gold option's text
    ("\\boxed{7}", ["3", "5", "7", "9", "11"], "B", "7", False),
    ("\\boxed{\\pi}", [], "3.14", "\\pi", True),                            # eval('pi') is math.pi
    ("\\boxed{a}", [], "2", "a", False),                                  # NameError -> not equal
]


def mathv_rows(repo):
    rows = []
    for resp, opts, gold, ma, exp in MATHV_HAND:
        rows.append({"origin": "hand", "response": resp, "options": opts, "answer": gold,
                     "expected_model_answer": ma, "expected": exp})
    raw = {}
    for line in open(os.path.join(repo, "data/test.jsonl"), encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            raw[r["id"]] = r
    for fname in ("outputs/closed-source/Gemini/Gemini-Pro-CoT.jsonl", "outputs/closed-source/GPT/GPT4-CoT (Text Only).jsonl"):
        for i, line in enumerate(open(os.path.join(repo, fname), encoding="utf-8")):
            if i % 20 or not line.strip():
                continue
            o = json.loads(line)
            if len(o["response"]) > 1500:
                continue
            r = raw[o["id"]]
            rows.append({"origin": f"MATH-V {fname}#{o['id']}", "response": o["response"], "options": r["options"],
                         "answer": str(r["answer"]), "expected_model_answer": o["model_answer"],
                         "expected": o["correct"] in (True, "True")})
    return rows


if __name__ == "__main__":
    write("mmmu.jsonl", mmmu_rows())
    write("puzzlevqa.jsonl", puzzle_rows([["3", "4", "5", "6"], ["red", "green", "blue", "yellow"],
                                          ["1", "2", "2.5", "3"], ["small", "medium", "large"],
                                          ["triangle", "square", "pentagon", "hexagon"]]))
    write("algopuzzlevqa.jsonl", puzzle_rows([["1", "2", "3", "4"], ["Yes", "No"], ["left", "right", "up", "down"],
                                              ["12", "15", "18", "21"]]))
    write("mathvista.jsonl", mathvista_rows(sys.argv[1]))
    write("mathvision.jsonl", mathv_rows(sys.argv[2]))
