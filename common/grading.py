"""Rule-based reward: pull the final answer out of a response and check it against the ground truth.

    extract_answer(response)            the final answer string, or None
    grade(response, ground_truth)       1.0 / 0.0 in the calling thread (equivalence by math-verify)
    grade_batch(responses, truths)      the same for thousands of responses, in a pool of processes
                                        with a hard per-item deadline

Which answer: DAPO tells the model "The last line of your response should be of the form Answer: $Answer",
so the answer is the text after the colon on the LAST line that starts with "Answer:" (case-insensitive;
leading whitespace, markdown bold and a "Final" prefix tolerated; lines with nothing after the colon are
skipped; a \\boxed{...} on that line is the answer). Without such a line it is the content of the last
\\boxed{...} / \\fbox{...}. Unlike DAPO's own reward (verl's math_dapo.py: normalised string equality,
-1/+1), equivalence is decided by math-verify, so "0.5" matches "\\frac{1}{2}" and "5 cm" matches "5";
rewards are 0/1 (map them in the script if you want DAPO's -1/+1).

Decisions the tests pin down (math-verify's behaviour, kept on purpose):
  * percentages: "50\\%" matches both "50" and "0.5"; "0.5" does NOT match a gold of "50".
  * "x = 5" matches "5" (math-verify keeps the right-hand side of an assignment).
  * floats are compared after rounding to 6 decimals: "3.14159" does not match "\\pi".
  * "1,000" matches "1000", and "1, 2" is the set {1, 2} (order-free).
  * e-notation is a number: "4.5e33", "4.5E+33", "4.5 \\times 10^{33}", "4.5 \\cdot 10^33" are equal in
    either role (Minerva's gold answers use the first form, models the others). So "2e-1" is 0.2, not 2e - 1.
  * multiple choice (GPQA, `is_choice=True`): the answer must BE a letter ("C", "(C)", "C) 42",
    "\\text{C}"); "The answer is C" scores 0, as it would under DAPO's instruction.
  * an answer over 1000 characters, nested more than 10 brackets deep, or with control characters
    (NUL, ...) scores 0 unparsed (see is_hostile).

Why a process pool: math-verify bounds parsing and comparison with signal.alarm, which only works in a
process's main thread. Called from any other thread it raises, and a grader that swallows that error scores
everything 0 (verl shipped exactly this bug). And a signal handler only runs between Python bytecodes: one
long C call (a huge integer power, a regex) runs to completion, or to the OOM killer. So grade_batch sends
each item to a worker process that grades in its own main thread (math-verify's timeouts work there), and
the parent kills any worker that overruns the item's deadline or dies, scoring that item 0.0 and starting
a fresh worker. Cheap pre-filters (answer length, bracket depth, exponent towers, giant factorials) reject
obvious denial-of-service answers before sympy sees them.
"""
import atexit
import collections
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

# Imported lazily (see _math_verify): sympy + the ANTLR parser add ~0.5 s to `import common`.
_mv = None

MAX_ANSWER_CHARS = 1000     # longer "answers" are junk, and antlr/sympy time grows with length
MAX_NESTING_DEPTH = 10      # math-verify's ANTLR grammar is exponential in bracket depth: ~0.5 s at 10, >5 s at 20
MAX_EXPONENT_DIGITS = 6     # 2^{1234567}: evaluating it is one long C call that no signal interrupts
MAX_FACTORIAL_DIGITS = 4    # 100000!, \binom{10^9}{...}: same risk; each runs into math-verify's timeout

# ----------------------------------------------------------------------------- extraction

# "Answer: 5", "  **Answer:** 5", "**Answer**: 5", "Final answer: 5"; [ \t] instead of \s so that a
# match never spans lines (and the regex stays linear on 1 MB of junk).
_ANSWER_LINE = re.compile(r"^[ \t>#*_]*(?:final[ \t]+)?answer[ \t*_]*:(.*)$", re.IGNORECASE | re.MULTILINE)
_BOXED = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_BRACES = re.compile(r"[{}]")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}); None if there is none or it never closes.

    Only the last occurrence is tried: falling back to earlier ones would make a hostile response with
    many unterminated \\boxed{ quadratic to scan.
    """
    box = None
    for box in _BOXED.finditer(text):
        pass
    if box is None:
        return None
    depth = 1
    for brace in _BRACES.finditer(text, box.end()):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[box.end():brace.start()]
    return None


def _clean(answer: str) -> str:
    """Strip markdown emphasis, one pair of math delimiters and a trailing period."""
    for _ in range(2):   # "**42**." and "42.**" alike
        answer = answer.strip().strip("*_").strip().removesuffix(".")
    for left, right in _DELIMITERS:
        inner = answer[len(left):-len(right)]
        # "$x$ and $y$" starts and ends with "$" but is not one formula.
        if (len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right)
                and left not in inner and right not in inner):
            answer = inner
            break
    return answer.strip().removesuffix(".").strip()


def extract_answer(response: str | None) -> str | None:
    """The final answer in a response (see the module docstring for the rules), or None."""
    if not isinstance(response, str):
        return None
    answer = None
    for match in _ANSWER_LINE.finditer(response):
        content = _clean(match.group(1))
        if content:
            answer = content
    if answer is not None:
        # "Answer: $\boxed{5}$" is common: a box on the Answer line is the answer. (math-verify would pick
        # it out of "Answer: 4, not \boxed{3}" anyway: its LaTeX normalisation unwraps boxes.)
        boxed = _last_boxed(answer)
        return _clean(boxed) if boxed is not None and _clean(boxed) else answer
    boxed = _last_boxed(response)
    if boxed is None:
        return None
    return _clean(boxed) or None


# ----------------------------------------------------------------------------- pre-filters

# A numeric power tower, a^b^c or a^{b^{c}} with digits at the bottom two levels: 9^9^9 has ~10^8 digits.
_TOWER = re.compile(r"\d[ \t}]*(?:\^|\*\*)[ \t{(]*\d+[ \t})]*(?:\^|\*\*)")
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)[ \t{(]*-?\d{%d,}" % (MAX_EXPONENT_DIGITS + 1))
_BIG_FACTORIAL = re.compile(r"\d{%d,}[ \t})]*!" % (MAX_FACTORIAL_DIGITS + 1))
_BIG_BINOMIAL = re.compile(r"\\[dt]?binom[ \t]*\{[ \t]*\d{%d,}" % (MAX_FACTORIAL_DIGITS + 1))
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(depth - 1, 0)
    return deepest


def is_hostile(answer: str) -> bool:
    """True for answers that could stall the parser or sympy; they score 0 without being parsed.

    A heuristic first line of defence only (no correct answer in our data looks like this); the worker
    deadline in grade_batch is the guarantee.
    """
    return (len(answer) > MAX_ANSWER_CHARS
            or _CONTROL_CHARS.search(answer) is not None
            or _nesting_depth(answer) > MAX_NESTING_DEPTH
            or _TOWER.search(answer) is not None
            or _BIG_EXPONENT.search(answer) is not None
            or _BIG_FACTORIAL.search(answer) is not None
            or _BIG_BINOMIAL.search(answer) is not None)


# ----------------------------------------------------------------------------- grading

_SPACING = re.compile(r"\\left|\\right|\\[!,;: ]|\s+")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")


def _normalize(answer: str) -> str:
    """Meaning-preserving spelling normalisation for the exact-match shortcut (never lowercases)."""
    answer = _TEXT_MACRO.sub(r"\1", _clean(answer))
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SPACING.sub("", answer).removesuffix(".")


# 4.5e33, 4.5E+33, 1e-3: a whole number token (not the tail of a name or of a longer number, not 2e^{3}).
_E_NOTATION = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\d.^])")


def _expand_e_notation(answer: str) -> str:
    """4.5e33 -> 4.5 \\times 10^{33}: math-verify reads e-notation as a product with Euler's e and never
    matches it to the LaTeX form, which it does compare as a number (with relative precision)."""
    return _E_NOTATION.sub(lambda m: f"{m.group(1)} \\times 10^{{{int(m.group(2))}}}", answer)


def _math_verify():
    global _mv
    if _mv is None:
        import math_verify
        _mv = math_verify
    return _mv


_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[")   # an unescaped $, \( or \[ ("\$5" is five dollars)


def _wrap(answer: str) -> str:
    # math-verify's parse() searches free text for an answer; given a bare "x = 5" or "10^{-3}" it picks
    # a number out of it ("5", "10"). Inside $...$ the whole string is parsed as one LaTeX expression.
    # An answer that brings its own delimiters ("the area is $5$ cm") is parsed as it is.
    return answer if _MATH_DELIMITER.search(answer) else f"${answer}$"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, alarm_s: int | None):
    # n samples per prompt share one ground truth: parse it once per worker.
    return _math_verify().parse(_wrap(gold), parsing_timeout=alarm_s)


_CHOICE = re.compile(r"(?:option|choice)?[ \t]*\(?([A-Z])(?:\)|\.|:|[ \t]|$)", re.IGNORECASE)


def _choice_letter(answer: str) -> str | None:
    """The option letter: C for "C", "(C)", "C) 42", "Option C", "\\text{C}"; it must come first, alone."""
    answer = _TEXT_MACRO.sub(r"\1", _clean(answer)).strip("*_ ")
    match = _CHOICE.match(answer)
    # The letter itself must be a capital: "a" after "Answer:" is more likely an article than option A.
    return match.group(1) if match and match.group(1).isupper() else None


def _check_ground_truth(ground_truth: str, is_choice: bool) -> str:
    """The cleaned ground truth (its letter for multiple choice). Raises on bad data: a ground truth
    that can never match would otherwise score every response 0 without a word."""
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground truth must be a str, got {type(ground_truth).__name__}: {ground_truth!r:.50}")
    gold = _clean(ground_truth)
    if is_choice:
        letter = _choice_letter(gold)
        if letter is None:
            raise ValueError(f"multiple-choice ground truth must be an option letter, got {ground_truth!r:.50}")
        return letter
    if not gold:
        raise ValueError("empty ground truth")
    return gold


def grade(response: str | None, ground_truth: str, *, is_choice: bool = False, timeout_s: float = 2.0) -> float:
    """1.0 if the response's final answer equals the ground truth, else 0.0.

    Never raises on the response; raises TypeError/ValueError on a ground truth that cannot be graded
    (not a str, empty, or not a letter when is_choice).

    is_choice: multiple choice (GPQA): compare option letters instead of math.
    timeout_s: math-verify's own limit for each parse and each comparison, floored to whole seconds
        (>= 1) because it uses signal.alarm. That only works in the main thread: in any other thread the
        limit is switched off (math-verify would raise otherwise) and only the pre-filters protect you.
        Note that math-verify replaces and cancels any SIGALRM timer of the caller. For many responses,
        or untrusted ones off the main thread, use grade_batch.
    """
    gold = _check_ground_truth(ground_truth, is_choice)
    try:
        answer = extract_answer(response)
        if answer is None or is_hostile(answer):
            return 0.0
        if is_choice:
            return float(_choice_letter(answer) == gold)
        answer, gold = _expand_e_notation(answer), _expand_e_notation(gold)
        if is_hostile(answer):   # 1e9999999 becomes a huge power
            return 0.0
        if _normalize(answer) == _normalize(gold) != "":
            return 1.0   # the common case for integer answers, and the only way to match plain text
        main = threading.current_thread() is threading.main_thread()
        alarm_s = max(1, int(timeout_s)) if main else None
        mv = _math_verify()
        pred = mv.parse(_wrap(answer), parsing_timeout=alarm_s)
        # Gold first: verify() is not symmetric (assignments and intervals are unwrapped on one side only).
        return float(bool(pred) and mv.verify(_parse_gold(gold, alarm_s), pred, timeout_seconds=alarm_s))
    except BaseException as e:
        # math-verify's TimeoutException derives from BaseException; let only Ctrl-C and exit through.
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return 0.0


# ----------------------------------------------------------------------------- process pool

_READY = "ready"
WORKER_MEMORY_BYTES = 4 << 30        # extra address space per worker: sympy runs out of it, not the host
WORKER_START_TIMEOUT_S = 120.0       # spawn + imports (the caller's __main__ is re-imported, maybe torch)


def _limit_memory(extra_bytes: int):
    # A MemoryError inside the worker scores 0.0; without a cap, a runaway sympy expansion could get
    # the OOM killer to pick the trainer instead. The cap is on top of what the worker already maps.
    try:
        import resource
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, OSError, ValueError):
        pass


def _worker_main(conn):
    """Grade (index, kwargs) requests until the parent hangs up. Runs in the worker's main thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's business; we exit on EOF
    _limit_memory(WORKER_MEMORY_BYTES)
    _math_verify()
    conn.send(_READY)
    while True:
        try:
            index, grade_fn, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            score = float(grade_fn(*args, **kwargs))
        except BaseException:
            score = 0.0
        conn.send((index, score))


class _Worker:
    def __init__(self, ctx):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="grading-worker")
        self.process.start()
        child_conn.close()
        self.started = time.monotonic()
        self.ready = False
        self.item = None          # index of the item being graded
        self.deadline = math.inf

    def kill(self):
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


class _Pool:
    """Worker processes that each grade one item at a time; any worker can be killed and replaced."""

    def __init__(self, num_workers: int, context: str):
        self.num_workers, self.context = num_workers, context
        self.ctx = multiprocessing.get_context(context)
        self.workers = [_Worker(self.ctx) for _ in range(num_workers)]
        self.failed_starts = 0

    def _replace(self, worker: _Worker):
        worker.kill()
        if not worker.ready:
            # Dying before ready is a setup problem (e.g. an unguarded __main__), not a hostile answer.
            self.failed_starts += 1
            if self.failed_starts > 3 * self.num_workers:
                raise RuntimeError("grading workers keep dying at start-up; is the script's entry point "
                                   "behind `if __name__ == '__main__':`? (multiprocessing spawn re-imports it)")
        self.workers[self.workers.index(worker)] = _Worker(self.ctx)

    def run(self, jobs: list, timeout_s: float) -> list[float]:
        """jobs[i] = (grade_fn, args, kwargs); returns the scores in order, 0.0 where a worker failed."""
        scores = [0.0] * len(jobs)
        todo = collections.deque(range(len(jobs)))
        busy = 0
        while todo or busy:
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.ready and worker.item is None and todo:
                    # A worker that died while idle (between batches, say) must not cost an item.
                    if not worker.process.is_alive():
                        self._replace(worker)
                        continue
                    index = todo.popleft()
                    try:
                        worker.conn.send((index, *jobs[index]))
                    except (OSError, ValueError):   # died just now; the item is retried on a fresh worker
                        todo.appendleft(index)
                        self._replace(worker)
                        continue
                    worker.item, worker.deadline = index, now + timeout_s
                    busy += 1
                elif not worker.ready and now - worker.started > WORKER_START_TIMEOUT_S:
                    raise RuntimeError(f"a grading worker did not start within {WORKER_START_TIMEOUT_S:.0f} s")
            # Sleep until a worker answers, dies, or the earliest deadline passes.
            wake = min([w.deadline for w in self.workers] + [now + 1.0])
            handles = [w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]
            multiprocessing.connection.wait(handles, timeout=max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            for worker in list(self.workers):
                try:
                    while worker.conn.poll():
                        message = worker.conn.recv()
                        if message == _READY:
                            worker.ready = True
                            self.failed_starts = 0
                        else:
                            index, score = message
                            scores[index] = score
                            worker.item, worker.deadline = None, math.inf
                            busy -= 1
                    dead = not worker.process.is_alive()
                except (EOFError, OSError):
                    dead = True
                if dead or worker.deadline <= now:
                    # Hung (sympy in C, an infinite loop) or died (segfault, OOM, os._exit): this item
                    # keeps its 0.0 and the next one gets a fresh worker.
                    if worker.item is not None:
                        busy -= 1
                    self._replace(worker)
        return scores

    def close(self):
        for worker in self.workers:
            worker.kill()
        self.workers = []


_pool: _Pool | None = None
_pool_lock = threading.Lock()   # one batch at a time: the workers' pipes are not shareable


def shutdown_pool():
    """Stop the grading workers (also done at exit); the next grade_batch starts new ones."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


atexit.register(shutdown_pool)


def default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def grade_batch(responses: Sequence[str | None], ground_truths: Sequence[str], *,
                is_choice: bool | Sequence[bool] = False, num_workers: int | None = None,
                timeout_s: float = 5.0, context: str = "spawn",
                grade_fn: Callable[..., float] = grade) -> list[float]:
    """grade() for each (response, ground truth) pair, in input order, in worker processes.

    Never raises on model output and never hangs: an item whose worker overruns `timeout_s` (wall clock,
    from when a worker picks it up) or dies scores 0.0, and only that item. The pool outlives the call
    (started on first use, restarted per dead worker; shutdown_pool() stops it).

    is_choice: one flag for the batch or one per item (GPQA letters, see grade()).
    num_workers: processes to use (default min(8, CPUs)); 0 grades inline in this thread, without the
        deadline (tests and debugging).
    timeout_s: hard per-item deadline. Inside the worker math-verify gets a quarter of it (>= 1 s) so
        that a slow sympy call usually gives up on its own and the worker survives.
    context: "spawn" or "forkserver"; never fork, the caller may hold threads, CUDA or NCCL state.
        Like all of multiprocessing, this needs the caller's script behind `if __name__ == "__main__":`.
    grade_fn: a module-level function with grade()'s signature (it is pickled by name); the tests use
        it to inject crashes and hangs.
    """
    global _pool
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    choice_flags = [is_choice] * len(responses) if isinstance(is_choice, bool) else list(is_choice)
    if len(choice_flags) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(choice_flags)} is_choice flags")
    for truth, choice in zip(ground_truths, choice_flags):
        _check_ground_truth(truth, choice)   # here, not in a worker, where the error would become a 0.0
    if context not in ("spawn", "forkserver"):
        raise ValueError(f"context must be 'spawn' or 'forkserver', not {context!r}")
    inner_timeout_s = max(1.0, timeout_s / 4)
    jobs = [(grade_fn, (r, g), {"is_choice": c, "timeout_s": inner_timeout_s})
            for r, g, c in zip(responses, ground_truths, choice_flags)]
    num_workers = default_num_workers() if num_workers is None else num_workers
    if num_workers == 0 or not jobs:
        return [grade_fn(*args, **kwargs) for grade_fn, args, kwargs in jobs]
    with _pool_lock:
        if _pool is None or (_pool.num_workers, _pool.context) != (num_workers, context):
            if _pool is not None:
                _pool.close()
            _pool = _Pool(num_workers, context)
        try:
            return _pool.run(jobs, timeout_s)
        except BaseException:
            # Ctrl-C or a start-up failure mid-batch leaves workers in an unknown state: start afresh.
            _pool.close()
            _pool = None
            raise


def truncated_is_wrong(correct: list[float], finish_reasons: list[str], grade_truncated: bool = False) -> list[float]:
    """A response cut at the length limit (finish_reason "length") counts as wrong unless `grade_truncated`.

    Graded on its whole text, a response that writes "Answer: 5" and then loops until the limit scores +1 plus
    the overlong penalty (about 0), above a clean wrong answer (-1): RL would reward answering, then rambling,
    and accuracy, avg@k and pass@k would count it. (verl's DAPO scorer reads only the last 300 characters, so
    such a response is almost always wrong there too.) Used by rl_dapo.py, reheat_tsopsd.py and evaluate.py."""
    if len(correct) != len(finish_reasons):
        raise ValueError(f"{len(correct)} grades for {len(finish_reasons)} responses")
    return [c if grade_truncated or f != "length" else 0.0 for c, f in zip(correct, finish_reasons)]
