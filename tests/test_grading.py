"""common/grading.py: answer extraction, math-verify equivalence, and the crash-proof process pool.

The table pins down what counts as correct, including the places where math-verify's choices are
surprising (each is commented). The pool tests inject crashes and hangs through grade_batch's
`grade_fn` hook: the workers are spawned processes, so monkeypatching in this process would not reach them.
"""
import os
import random
import signal
import threading
import time

import pytest

from common import grading
from common.grading import extract_answer, grade, grade_batch

# (response, ground truth, expected reward)
MATH_CASES = [
    # integers and negatives
    ("Let me think.\nAnswer: 42", "42", 1.0),
    ("Answer: 41", "42", 0.0),
    ("Answer: -3", "-3", 1.0),
    ("Answer: 3", "-3", 0.0),
    # fractions, decimals, \frac / \dfrac
    ("Answer: 0.5", "\\frac{1}{2}", 1.0),
    ("Answer: 1/2", "0.5", 1.0),
    ("Answer: \\dfrac{1}{2}", "\\frac12", 1.0),
    ("Answer: \\frac{2}{4}", "\\frac{1}{2}", 1.0),
    ("Answer: -\\frac{1}{2}", "-0.5", 1.0),
    ("Answer: 1/3", "0.333333", 1.0),          # floats are compared after rounding to 6 decimals...
    ("Answer: 0.33", "\\frac{1}{3}", 0.0),     # ...so a 2-decimal approximation is wrong
    ("Answer: 3.0", "3", 1.0),
    ("Answer: 10^{-3}", "0.001", 1.0),         # bare, math-verify would read "10" out of this; we wrap in $...$
    # \boxed / \fbox and math delimiters
    ("so the result is \\boxed{42}.", "42", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\fbox{6}", "6", 1.0),
    ("\\boxed{3} ... \\boxed{4}", "3", 0.0),   # the last box wins
    ("Answer: $42$", "42", 1.0),
    ("Answer: $$42$$", "42", 1.0),
    ("Answer: \\(42\\)", "42", 1.0),
    ("Answer: $\\boxed{12}$", "12", 1.0),      # a line that is only a box: the box's content
    ("Answer: 4, not \\boxed{3}", "3", 1.0),   # a box on the Answer line wins (math-verify would unwrap it anyway)
    ("Answer: 4, not \\boxed{3}", "4", 0.0),
    # Answer-line formatting
    ("**Answer:** 12", "12", 1.0),
    ("**Answer**: 12", "12", 1.0),
    ("   answer: 12", "12", 1.0),
    ("Final Answer: 12", "12", 1.0),
    ("Answer: **12**.", "12", 1.0),
    ("The answer: 12", "12", 0.0),             # must START the line; no Answer line and no box -> nothing
    ("\\boxed{3}, so Answer: 4", "4", 0.0),    # "Answer:" mid-line is not an Answer line: the box (3) is used
    ("Answer:\n\\boxed{9}", "9", 1.0),         # an empty Answer line is skipped, the box is the fallback
    # several Answer lines: the last one wins; it need not be the last line
    ("Answer: 3\nWait, that is wrong.\nAnswer: 4", "4", 1.0),
    ("Answer: 3\nWait, that is wrong.\nAnswer: 4", "3", 0.0),
    ("Answer: 7\n\nI hope this helps!", "7", 1.0),
    # units and text around the answer (math-verify drops known units and \text{...})
    ("Answer: 5 cm", "5", 1.0),
    ("Answer: 6 \\text{ apples}", "6", 1.0),
    ("Answer: 90^\\circ", "90", 1.0),
    ("Answer: \\$6", "6", 1.0),
    ("Answer: 6 dollars", "6", 0.0),           # surprising: "dollars" is not a known unit, it parses as d*o*l*l*a*r*s
    ("Answer: $5$ cm", "5", 1.0),              # an answer with its own $...$ is parsed as it is
    ("Answer: $x = 5$", "5", 1.0),             # math-verify keeps the right-hand side of an assignment
    ("Answer: 12 or 13", "12", 0.0),
    ("Answer: \\text{Tuesday}", "Tuesday", 1.0),   # text answers only match through the exact-string path
    # sets, tuples, intervals
    ("Answer: $\\{1, 2\\}$", "\\{2, 1\\}", 1.0),
    ("Answer: 1, 2", "2, 1", 1.0),             # a bare comma list is a set: order-free
    ("Answer: (2, 1)", "(1, 2)", 0.0),         # ...but parentheses make it ordered (an interval or a tuple)
    ("Answer: [1, 2)", "[1,2)", 1.0),
    ("Answer: (1, 2]", "[1,2)", 0.0),
    ("Answer: x=3, y=4", "(3,4)", 1.0),
    # thousands separators
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: 1{,}000", "1000", 1.0),
    ("Answer: 1,000", "1", 0.0),
    # sqrt, pi, symbolic equivalence
    ("Answer: \\sqrt{8}", "2\\sqrt{2}", 1.0),
    ("Answer: \\sqrt{8}", "2\\sqrt{3}", 0.0),
    ("Answer: \\frac{\\pi}{2}", "\\pi/2", 1.0),
    ("Answer: 2\\pi", "2 \\pi", 1.0),
    ("Answer: 3.14159", "\\pi", 0.0),          # a decimal is not pi at 6-decimal rounding: wrong, as it should be
    ("Answer: x^2+2x+1", "(x+1)^2", 1.0),
    ("Answer: 2+1", "3", 1.0),                 # unsimplified arithmetic counts (math-verify evaluates it)
    # percentages (math-verify's rule, kept): "50%" matches 50 and 0.5, but "0.5" does not match 50
    ("Answer: 50\\%", "50", 1.0),
    ("Answer: 50%", "50", 1.0),
    ("Answer: 50\\%", "0.5", 1.0),
    ("Answer: 0.5", "50", 0.0),
    ("Answer: 50", "50\\%", 1.0),
    # ground truth with its own delimiters (OlympiadBench writes "$...$")
    ("Answer: 1/2", "$\\frac{1}{2}$", 1.0),
]

# e-notation (Minerva-Math's gold answers are written "4.5e33"): equal numbers in any of the forms match, in
# either role; a different mantissa, exponent or exponent sign does not.
E_NOTATION_CASES = [
    ("Answer: 4.5 \\times 10^{33}", "4.5e33", 1.0),
    ("Answer: 4.5e33", "4.5 \\times 10^{33}", 1.0),
    ("Answer: 4.5 \\cdot 10^{33}", "4.5e33", 1.0),
    ("Answer: 4.5e33", "4.5 \\cdot 10^{33}", 1.0),
    ("Answer: 4.5 \\times 10^33", "4.5e33", 1.0),       # no braces
    ("Answer: 4.5E+33", "4.5 \\times 10^{33}", 1.0),
    ("Answer: 4.5e33", "4.5E+33", 1.0),
    ("Answer: 4.5 \\times 10^{-3}", "4.5e-3", 1.0),
    ("Answer: 4.5e-3", "4.5 \\cdot 10^{-3}", 1.0),
    ("Answer: 0.0045", "4.5e-3", 1.0),
    ("Answer: 10^{33}", "1e33", 1.0),                     # a bare power of ten
    ("Answer: 1e33", "10^{33}", 1.0),
    ("Answer: 45 \\times 10^{32}", "4.5e33", 1.0),       # the same number, not normalised
    ("\\boxed{6.2 \\times 10^{-10}}", "6.2e-10", 1.0),
    ("Answer: 4.5 \\times 10^{33} kg", "4.5e33", 1.0),   # a known unit is dropped, as for plain numbers
    ("Answer: 4.5 \\times 10^{32}", "4.5e33", 0.0),      # different exponent
    ("Answer: 4.5e32", "4.5 \\times 10^{33}", 0.0),
    ("Answer: 4.5 \\times 10^{-33}", "4.5e33", 0.0),     # exponent sign
    ("Answer: 4.6 \\times 10^{33}", "4.5e33", 0.0),      # different mantissa
    ("Answer: 4.5e33", "4.6 \\cdot 10^{33}", 0.0),
    ("Answer: 4.6e-10", "4.5 \\times 10^{-10}", 0.0),    # tiny numbers are not all "0 after rounding"
    ("Answer: 4.5", "4.5e33", 0.0),
    ("Answer: 10^{33}", "4.5e33", 0.0),
]

# Multiple choice (GPQA): the answer must be the letter itself.
CHOICE_CASES = [
    ("Answer: C", "C", 1.0),
    ("Answer: (C)", "C", 1.0),
    ("Answer: C) 42", "C", 1.0),
    ("Answer: Option C", "C", 1.0),
    ("Answer: \\text{C}", "C", 1.0),
    ("\\boxed{C}", "C", 1.0),
    ("Answer: **C**.", "C", 1.0),
    ("Answer: B", "C", 0.0),
    ("Answer: c", "C", 0.0),                   # lowercase is not accepted: "a" is more often an article
    ("Answer: The answer is C", "C", 0.0),     # not the instructed format
    ("Answer: Cats", "C", 0.0),
    ("Answer: 42", "C", 0.0),
]


def _ids(cases):
    return [f"{i}-{r[-24:]!r}~{g!r}" for i, (r, g, _) in enumerate(cases)]


@pytest.mark.parametrize("response,ground_truth,expected", MATH_CASES, ids=_ids(MATH_CASES))
def test_grade_math(response, ground_truth, expected):
    assert grade(response, ground_truth) == expected


@pytest.mark.parametrize("response,ground_truth,expected", E_NOTATION_CASES, ids=_ids(E_NOTATION_CASES))
def test_grade_e_notation(response, ground_truth, expected):
    assert grade(response, ground_truth) == expected


@pytest.mark.parametrize("text,expanded", [
    ("4.5e33", "4.5 \\times 10^{33}"),
    ("-1.5E-07 m", "-1.5 \\times 10^{-7} m"),
    ("(2e3, 3e+4)", "(2 \\times 10^{3}, 3 \\times 10^{4})"),
    # not e-notation: Euler's e in a product or a power, a name, a hex-like id, a version string
    ("2e", "2e"), ("2e^{3}", "2e^{3}"), ("x2e3", "x2e3"), ("\\theta1e3", "\\theta1e3"), ("1.2e3.4", "1.2e3.4"),
])
def test_expand_e_notation(text, expanded):
    assert grading._expand_e_notation(text) == expanded


@pytest.mark.parametrize("response,ground_truth,expected", CHOICE_CASES, ids=_ids(CHOICE_CASES))
def test_grade_choice(response, ground_truth, expected):
    assert grade(response, ground_truth, is_choice=True) == expected


@pytest.mark.parametrize("response,expected", [
    ("Answer: 5", "5"),
    ("  **Answer:** $x = 5$.", "x = 5"),
    ("Answer: 1\nAnswer: 2\nThat is all.", "2"),
    ("Answer: 1\nAnswer:", "1"),               # an empty Answer line does not erase an earlier answer
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),   # balanced braces
    ("\\boxed{3} and finally \\fbox{4}", "4"),
    ("Answer: $x$ and $y$", "$x$ and $y$"),    # not one $...$ pair: left alone
    ("\\boxed{5", None),                       # unterminated
    ("no answer here", None),
    ("Answer:", None),
    ("", None),
    (None, None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("answer,hostile", [
    ("9^9^9", True), ("9^{9^{9}}", True), ("9**9**9", True), ("2^{10000000}", True), ("100000!", True),
    ("\\binom{1000000000}{3}", True), ("(" * 11 + "1" + ")" * 11, True), ("1" * 1001, True), ("5\x00", True),
    # legitimate answers must pass
    ("2^{2023}", False), ("e^{x^2}", False), ("10!", False), ("\\frac{\\sqrt{3}}{2}", False),
    ("(" * 10 + "1" + ")" * 10, False),
    ("\\left( \\frac{1}{2}, \\sqrt{3} \\right]", False), ("1.5 \\times 10^{-7}", False), ("2^{10}\\cdot 3^{5}", False),
])
def test_is_hostile(answer, hostile):
    assert grading.is_hostile(answer) == hostile


def test_grade_in_a_thread():
    # verl's bug: math-verify's signal.alarm raises off the main thread and everything scored 0.
    out = []
    thread = threading.Thread(target=lambda: out.extend(grade(r, g) for r, g, _ in MATH_CASES[:12]))
    thread.start()
    thread.join()
    assert out == [e for _, _, e in MATH_CASES[:12]]


def test_grade_batch_matches_grade():
    cases = MATH_CASES + CHOICE_CASES
    responses, truths, _ = zip(*cases)
    is_choice = [False] * len(MATH_CASES) + [True] * len(CHOICE_CASES)
    expected = [grade(r, g, is_choice=c) for r, g, c in zip(responses, truths, is_choice)]
    assert expected == [e for _, _, e in cases]
    assert grade_batch(responses, truths, is_choice=is_choice, num_workers=2) == expected
    assert grade_batch(responses, truths, is_choice=is_choice, num_workers=0) == expected
    assert grade_batch([], [], num_workers=2) == []


def _hostile_responses():
    rng = random.Random(0)
    junk = bytes(rng.randrange(256) for _ in range(100_000)).decode("utf-8", errors="replace")
    return [
        "x" * (1 << 20),                                   # 1 MB without an answer
        "Answer: " + "1" * (1 << 20),                      # a 1 MB answer
        "Answer: 1\n" * 100_000,                           # 1 MB of answers (the last one is graded)
        "Answer: " + "{" * 10_000 + "5" + "}" * 10_000,    # 10k nested braces
        "\\boxed{" * 10_000 + "5" + "}" * 10_000,          # 10k nested boxes
        "\\boxed{" * 10_000,                               # 10k unterminated boxes
        "Answer: " + "(" * 30 + "5" + ")" * 30,            # ANTLR is exponential in nesting depth
        "Answer: 9^9^9^9^9",
        "Answer: 9^{9^{9^{9^{9}}}}",
        "Answer: 9**9**9**9",
        "Answer: 100000!",
        "Answer: 2^{100000000}",
        "Answer: 9.9e99999999",                            # e-notation is a power of ten too
        "Answer: \\binom{1000000000}{500000000}",
        junk,                                              # random bytes
        "Answer: " + junk[:300],
        "Answer: 12345\x00",                               # NUL bytes
        "\x00" * 10_000,
        "Answer: \\frac{1}{",                              # unterminated LaTeX
        "Answer: $\\sqrt{",
        "Answer: \\left( \\frac{",
        "",
        "Answer:",
        "Answer:   \n",
        None,
    ]


def _within(seconds, fn, *args, **kwargs):
    """fn(*args, **kwargs), failing (instead of hanging the suite) if it takes longer than `seconds`.
    Runs it in a thread, which grade_batch must support anyway."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} still running after {seconds} s"
    assert out, f"{fn.__name__} raised"
    return out[0], time.monotonic() - start


def test_hostile_outputs_score_zero_quickly():
    hostile = _hostile_responses()
    # Loose, benchmark-style bound: the 5 s per-item deadline is never needed here (pre-filters and
    # math-verify's own timeouts answer first), but the whole batch must not take minutes.
    scores, elapsed = _within(60, grade_batch, hostile, ["12345"] * len(hostile), num_workers=2, timeout_s=5.0)
    assert scores == [0.0] * len(hostile)
    # The cheap checks run in the caller too: grade() itself never raises on any of these.
    assert [grade(r, "12345") for r in hostile] == [0.0] * len(hostile)


def _faulty_grade(response, ground_truth, **kwargs):
    """grade() with failure modes selected by the response (runs inside a pool worker)."""
    if response == "EXIT":
        os._exit(3)
    if response == "SEGFAULT":
        os.kill(os.getpid(), signal.SIGSEGV)
    if response == "HANG":
        time.sleep(3600)    # a C-level stall: math-verify's alarm is not even armed
    if response == "RAISE":
        raise RuntimeError("grader bug")
    return grade(response, ground_truth, **kwargs)


def test_worker_failure_costs_only_its_item():
    responses = ["Answer: 1", "EXIT", "Answer: 2", "HANG", "Answer: 3", "SEGFAULT", "RAISE", "Answer: 4",
                 "Answer: 5", "Answer: 6"]
    truths = ["1", "1", "2", "1", "3", "1", "1", "4", "5", "7"]
    scores, _ = _within(30, grade_batch, responses, truths, num_workers=2, timeout_s=2.0, grade_fn=_faulty_grade)
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    # The pool is still usable, and a worker that dies while idle is replaced too.
    idle_worker = grading._pool.workers[0].process
    idle_worker.kill()
    idle_worker.join()
    assert grade_batch(["Answer: 8", "Answer: 9"], ["8", "8"], num_workers=2) == [1.0, 0.0]


def test_grade_batch_from_a_thread():
    scores, _ = _within(30, grade_batch, ["Answer: 0.5", "Answer: 2"], ["\\frac{1}{2}", "3"], num_workers=2)
    assert scores == [1.0, 0.0]


def test_bad_ground_truth_raises():
    # Data bugs must be loud: a ground truth that can never match would score every response 0.
    with pytest.raises(TypeError):
        grade("Answer: 1", 1)
    with pytest.raises(ValueError):
        grade("Answer: 1", " ")
    with pytest.raises(ValueError):
        grade("Answer: C", "42", is_choice=True)
    with pytest.raises(TypeError):    # checked in the caller, before any worker sees it
        grade_batch(["Answer: 1", "Answer: 2"], ["1", None], num_workers=2)
    with pytest.raises(ValueError):
        grade_batch(["Answer: 1"], [], num_workers=0)
