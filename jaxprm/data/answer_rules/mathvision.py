"""MATH-Vision's official answer rules (github.com/mathllm/MATH-V ``evaluation/evaluate.py`` and
``evaluation/utils.py``), re-implemented with their quirks.

``model_answer`` reproduces ``evaluate()``'s extraction: a response ending in " C." / " (C)." or
starting with "C\\n" / "(C)\\n" / "(C) C\\n" becomes that letter (A-E); a number after the last "is "
is taken; without ``\\boxed`` the text after the last "the final answer is" / "the answer is" / "the
correct answer is" / "the answer should be" (also capitalised) up to the line end or ". "; with
several boxes the last one. ``find_math_answer`` then lower-cases, takes the boxed content (greedy:
up to the *last* "}"), the part after "=" and "\\approx", and strips LaTeX (``_strip_string``).

``is_equal`` (correct when the gold letter or the gold option text equals the model answer):
lower-cased strings equal after stripping; else tuples "(a,b)" / lists "[a,b]" compared
element-wise after rounding each to 2 decimals; else both sides parsed as LaTeX math and evaluated,
equal when ``round(value, 2)`` agree. The official code parses with ``latex2sympy2`` and evaluates
``str(expr)`` with ``math``'s names; ``latex_value`` here parses the same common subset with sympy
(numbers, + - * / ^, ``\\frac``, ``\\sqrt``, ``\\pi``, ``\\cdot``, ``\\times``, ``\\div``, implicit
products, parentheses and braces; a letter is a symbol, which evaluates only when ``math`` has that
name, e.g. ``e``); anything outside it counts as not parseable, which the official code also
treats as "not equal".
"""
from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["find_math_answer", "is_equal", "latex_value", "model_answer", "strip_string"]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- string cleanup


def _fix_fracs(s: str) -> str:
    """``_fix_fracs``: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub[:1] == "{":
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b = sub[0], sub[1]
        if b != "{":
            out += "{" + a + "}{" + b + "}" + sub[2:]
        else:
            out += "{" + a + "}" + b + sub[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """``_fix_a_slash_b``: "3/4" (two plain integers) -> ``\\frac{3}{4}``."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _fix_sqrt(s: str) -> str:
    """``_fix_sqrt``: ``\\sqrt3`` -> ``\\sqrt{3}``."""
    parts = s.split("\\sqrt")
    out = parts[0]
    for sub in parts[1:]:
        if sub and sub[0] != "{":
            out += "\\sqrt{" + sub[0] + "}" + sub[1:]
        else:
            out += "\\sqrt" + sub
    return out


def strip_string(s: str) -> str:
    """MATH-V's ``_strip_string`` (the MATH dataset's normaliser as MATH-V modified it: fractions
    are only re-braced when the string contains "sqrt", and "0.5" becomes ``\\frac{1}{2}``)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.split("\\text{ ")[0]  # _remove_right_units
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = _fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:
        s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def find_math_answer(s: str) -> str:
    """MATH-V's ``find_math_answer``: lower-case; drop "{}"; the text between the first "oxed{" and
    the last "}" (greedy, as ``re.findall('oxed{(.*)}', re.S)[-1]``), else the whole string; cut at
    a "}" that comes before any "{"; keep what follows the last "=" and "\\approx"; remove spaces,
    ``\\,``, ``\\text``, ``\\mbox``, ``\\left``/``\\right``, degree marks and a few units (m^3, km,
    units); then ``strip_string``."""
    s = s.lower()
    s = s.replace("{}", "")
    found = re.findall(r"oxed{(.*)}", s, flags=re.S)
    ans = found[-1] if found else s
    close, opn = ans.find("}"), ans.find("{")
    if close != -1 and (opn == -1 or close < opn):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1]
    ans = ans.split("\\approx")[-1]
    ans = ans.replace(" ", "").replace("\\,", "").replace("∞", "\\infty")
    ans = ans.replace("+\\infty", "\\infty").replace("\\\\", "\\").replace("\n", "")
    ans = ans.replace("\\text", "").replace("\\mbox", "").replace("bmatrix", "pmatrix")
    ans = ans.replace("\\left", "").replace("\\right", "").replace("^{\\circ}", "")
    ans = ans.replace("^\\circ", "").replace("{m}^3", "").replace("m^3", "")
    ans = ans.replace("{units}", "").replace("units", "").replace("{km}", "").replace("km", "")
    return strip_string(ans)


_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


def model_answer(response: str) -> str:
    """The answer ``evaluate()`` extracts from a response (see the module docstring)."""
    ans = response.strip()
    for c in "ABCDE":
        if (ans.endswith(f" {c}.") or ans.endswith(f" ({c}).") or ans.startswith(f"{c}\n")
                or ans.startswith(f"({c})\n") or ans.startswith(f"({c}) {c}\n")):
            ans = c
    tail = ans.split("is ")[-1].rstrip(".")
    if _is_number(tail):
        ans = tail
    if "oxed{" not in ans:
        for flag in _FLAGS:
            for f in (flag, flag.replace("the", "The")):
                raw = ans
                ans = ans.split(f)[-1].strip()
                if f in raw:
                    ans = ans.split("\n")[0].split(". ")[0]
    elif ans.count("oxed{") > 1:
        ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = find_math_answer(ans)
    for x in "abcde":
        ans = ans.replace(f"({x})", x)
    for x in "abcde":
        ans = ans.replace("{" + x + "}", x)
    return ans.rstrip(".").lstrip(":").strip()


# ----------------------------------------------------------------------------- LaTeX -> value


class _ParseError(ValueError):
    pass


_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|(\\[a-zA-Z]+)|([a-zA-Z])|(.))", re.S)
_IGNORED_COMMANDS = {"\\displaystyle", "\\left", "\\right", "\\,", "\\!", "\\;"}


def _tokens(s: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    s = s.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        num, cmd, letter, other = m.groups()
        if num is not None:
            out.append(("num", num))
        elif cmd is not None:
            if cmd in _IGNORED_COMMANDS:
                continue
            out.append(("cmd", cmd))
        elif letter is not None:
            out.append(("sym", letter))
        elif other is not None and not other.isspace():
            out.append(("op", other))
    return out


class _Parser:
    """Recursive-descent parser for the LaTeX subset described in the module docstring, producing
    a sympy expression."""

    def __init__(self, s: str):
        import sympy

        self.sp = sympy
        self.toks = _tokens(s)
        self.i = 0
        self.symbols: set[str] = set()  # every letter read (sympy may simplify x*0 away; eval() would not)

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self, kind=None, value=None):
        k, v = self.peek()
        if k is None or (kind and k != kind) or (value and v != value):
            raise _ParseError(f"expected {value or kind}, got {v!r}")
        self.i += 1
        return v

    def parse(self):
        if not self.toks:
            raise _ParseError("empty")
        e = self.expr()
        # latex2sympy's grammar does not require the end of input: a complete expression followed
        # by an unmatched "}" is read as that expression (MATH-V counts "2\\sqrt{3}}.so,..." as 2√3)
        if self.i != len(self.toks) and self.peek() != ("op", "}"):
            raise _ParseError(f"unexpected {self.peek()[1]!r}")
        return e

    def expr(self):
        e = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()
            r = self.term()
            e = e + r if op == "+" else e - r
        return e

    def term(self):
        e = self.unary()
        while True:
            k, v = self.peek()
            if (k, v) in (("op", "*"), ("cmd", "\\cdot"), ("cmd", "\\times")):
                self.take()
                e = e * self.unary()
            elif (k, v) in (("op", "/"), ("cmd", "\\div")):
                self.take()
                e = e / self.unary()
            elif k in ("num", "sym") or (k == "cmd" and v in ("\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\pi")) \
                    or (k, v) in (("op", "("), ("op", "{")):
                e = e * self.power()  # implicit product
            else:
                return e

    def unary(self):
        if self.peek() == ("op", "-"):
            self.take()
            return -self.unary()
        if self.peek() == ("op", "+"):
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == ("op", "^"):
            self.take()
            exp = self.group_or_atom()
            return base ** exp
        return base

    def group_or_atom(self):
        if self.peek() == ("op", "{"):
            self.take()
            e = self.expr()
            self.take("op", "}")
            return e
        if self.peek() == ("op", "-"):
            self.take()
            return -self.atom()
        return self.atom()

    def braced(self):
        self.take("op", "{")
        e = self.expr()
        self.take("op", "}")
        return e

    def atom(self):
        sp = self.sp
        k, v = self.peek()
        if k == "num":
            self.take()
            if "." in v:
                return sp.Float(v)
            return sp.Integer(v)
        if k == "sym":
            self.take()
            self.symbols.add(v)
            return sp.Symbol(v)
        if k == "op" and v in "({[":
            close = {"(": ")", "{": "}", "[": "]"}[v]
            self.take()
            e = self.expr()
            self.take("op", close)
            return e
        if k == "cmd":
            self.take()
            if v in ("\\frac", "\\dfrac", "\\tfrac"):
                num = self.braced()
                den = self.braced()
                return num / den
            if v == "\\sqrt":
                if self.peek() == ("op", "["):
                    self.take()
                    n = self.expr()
                    self.take("op", "]")
                    return sp.root(self.braced(), n)
                return sp.sqrt(self.braced())
            if v == "\\pi":
                return sp.pi
        raise _ParseError(f"unsupported {v!r}")


_MATH_NAMES = {k: getattr(math, k) for k in dir(math) if not k.startswith("_")}


def latex_value(s: str) -> float:
    """The numeric value MATH-V computes as ``eval(str(latex2sympy(s)))`` (``from math import *``
    in scope), for the subset in the module docstring. Raises ``ValueError`` when the string is
    outside it or does not evaluate to a real number (the official code then says "not equal")."""
    s = s.replace("$", "")  # latex2sympy reads "$x$" as x
    parser = _Parser(s)
    try:
        expr = parser.parse()
    except (_ParseError, ZeroDivisionError, TypeError) as e:
        raise ValueError(f"cannot parse {s!r}: {e}") from None
    subs = {}
    for name in parser.symbols:
        val = _MATH_NAMES.get(name)
        if not isinstance(val, (int, float)):
            raise ValueError(f"{s!r}: free symbol {name!r}")  # eval(): NameError
        subs[parser.sp.Symbol(name)] = val
    if subs:
        expr = expr.subs(subs)
    try:
        val = complex(expr.evalf())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{s!r}: not a number ({e})") from None
    if val.imag != 0 or not math.isfinite(val.real):
        raise ValueError(f"{s!r}: not a finite real number")
    return val.real


def _python_int(sub: str, value: float) -> bool:
    """Whether ``eval(str(latex2sympy(sub)))`` is a Python int: integer literals combined with
    + - * and non-negative integer powers (sympy keeps them Integer, and a square root that comes
    out whole too); any division, decimal, ``\\pi`` or letter makes it a float."""
    toks = _tokens(sub.replace("$", ""))
    for k, v in toks:
        if k == "num" and "." in v:
            return False
        if k == "sym" or (k == "cmd" and v in ("\\frac", "\\dfrac", "\\tfrac", "\\div", "\\pi")):
            return False
        if (k, v) == ("op", "/"):
            return False
    for j, (k, v) in enumerate(toks):
        if (k, v) == ("op", "^") and j + 1 < len(toks) and toks[j + 1] == ("op", "-"):
            return False
    return float(value).is_integer()


def _round2_str(sub: str) -> str:
    """``str(round(eval(str(latex2sympy(sub))), 2))``: "6" for an int, "6.0" / "0.33" for a float."""
    v = latex_value(sub)
    if _python_int(sub, v):
        return str(int(round(v)))
    return str(round(v, 2))


def _eval_tuple(s: str) -> str:
    """MATH-V's ``eval_tuple``: "(a,b,...)" / "[a,b,...]" with more than one element -> each
    element's value rounded to 2 decimals (elements containing "infty" and "a"/"-a" kept); the
    string unchanged when any element fails or it is not a tuple."""
    if not s:
        return s
    parts = s[1:-1].split(",")
    if len(parts) > 1 and ((s[0] == "(" and s[-1] == ")") or (s[0] == "[" and s[-1] == "]")):
        try:
            vals = [p if ("infty" in p or p in ("a", "-a")) else _round2_str(p) for p in parts]
        except ValueError:
            return s
        return f"{s[0]}{','.join(vals)}{s[-1]}"
    return s


def is_equal(a: Any, b: Any) -> bool:
    """MATH-V's ``is_equal`` (see the module docstring): case-insensitive string equality, tuples
    compared element-wise at 2 decimals, else LaTeX values equal after ``round(., 2)``; an empty
    side is never equal."""
    a, b = str(a).lower(), str(b).lower()
    if a.replace(" ", "") == "" or b.replace(" ", "") == "":
        return False
    if a.strip() == b.strip():
        return True
    a, b = _eval_tuple(a), _eval_tuple(b)
    if a == b:
        return True
    try:
        return round(latex_value(a), 2) == round(latex_value(b), 2)
    except ValueError:
        return False
