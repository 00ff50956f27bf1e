"""Training prompts and evaluation sets: hub ids or local files, one `Problem` type, DAPO's prompt.

Every source becomes a list of `Problem(problem, answer, ...)`, the bare problem text (any instruction
wrapper removed) and its ground truth; `render_prompt` then wraps it the one way the run asks for.

Named sources (loaded through `datasets`; none can be downloaded on CI, so every mapping is tested
on local files in the same schema, see tests/test_data.py):

| name          | hub id                           | config              | split | problem field   | answer field              |
|---------------|----------------------------------|---------------------|-------|-----------------|---------------------------|
| dapo17k       | BytedTsinghua-SIA/DAPO-Math-17k  |                     | train | prompt[-1].content (DAPO wrapper stripped) | reward_model.ground_truth |
| aime24        | HuggingFaceH4/aime_2024          |                     | train | problem         | answer                    |
| aime25        | math-ai/aime25                   |                     | test  | problem         | answer                    |
| amc23         | math-ai/amc23                    |                     | test  | question        | answer                    |
| math500       | HuggingFaceH4/MATH-500           |                     | test  | problem         | answer                    |
| minerva       | math-ai/minervamath              |                     | test  | question        | answer                    |
| olympiadbench | Hothan/OlympiadBench             | OE_TO_maths_en_COMP | train | question        | final_answer (a list)     |
| gpqa_diamond  | Idavidrein/gpqa (gated)          | gpqa_diamond        | train | Question        | Correct Answer + Incorrect Answer 1..3 |

DAPO-Math-17k's parquet repeats each of its ~17k prompts many times (1.79M rows): loading de-duplicates
on the problem text. OlympiadBench's OE_TO_maths_en_COMP config has 674 rows on the hub (papers often
quote 675, from another copy), so its scores are over 674 problems. GPQA is multiple choice: the four
options are shuffled with a fixed seed per question, shown as "A) ... D)", and the ground truth becomes
the letter (graded by letter). GPQA is gated: accept its licence once on
https://huggingface.co/datasets/Idavidrein/gpqa, then `hf auth login` (`huggingface-cli login` before
huggingface_hub 1.0) or set HF_TOKEN; without that, loading it raises a DataError saying so.

A local file (.jsonl, .json or .parquet) in any of these schemas loads the same way: `load_problems(path)`
detects the schema from its fields, or `load_problems("math500", path=...)` forces a named one.
A bad row (missing field, empty text) raises before any compute, naming the file, row (0-based) and
field; a line of a .jsonl file that is not a JSON object raises naming the file and line (1-based).
"""
import dataclasses
import json
import os
import random
import zlib

# DAPO-Math-17k's instruction, verbatim: the model is told to end with "Answer: $Answer".
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."
PROMPT_STYLES = ("dapo_chat", "dapo_raw", "plain")


@dataclasses.dataclass
class Problem:
    problem: str                      # the bare problem text, without any instruction around it
    answer: str                       # ground truth (a letter for multiple choice)
    id: str                           # stable identifier: "<source>:<row>" or the data set's own id
    source: str                       # data_source / benchmark name
    is_choice: bool = False           # multiple choice: graded by letter
    solution: str | None = None       # a worked solution when the data has one (synthetic data)


@dataclasses.dataclass(frozen=True)
class Spec:
    hub_id: str
    config: str | None
    split: str
    schema: str                       # "dapo" | "qa" | "gpqa"
    problem_field: str = "problem"
    answer_field: str = "answer"


BENCHMARKS = {
    "dapo17k": Spec("BytedTsinghua-SIA/DAPO-Math-17k", None, "train", "dapo"),
    "aime24": Spec("HuggingFaceH4/aime_2024", None, "train", "qa"),
    "aime25": Spec("math-ai/aime25", None, "test", "qa"),
    "amc23": Spec("math-ai/amc23", None, "test", "qa", problem_field="question"),
    "math500": Spec("HuggingFaceH4/MATH-500", None, "test", "qa"),
    "minerva": Spec("math-ai/minervamath", None, "test", "qa", problem_field="question"),
    "olympiadbench": Spec("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "qa",
                          problem_field="question", answer_field="final_answer"),
    "gpqa_diamond": Spec("Idavidrein/gpqa", "gpqa_diamond", "train", "gpqa"),
}
LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file, the row and the field."""


def dapo_instruction(problem: str) -> str:
    return DAPO_PREFIX + problem + DAPO_SUFFIX


def strip_dapo_instruction(text: str) -> str:
    """The bare problem inside DAPO's wrapper (text without the wrapper is returned as is)."""
    if text.startswith(DAPO_PREFIX):
        text = text[len(DAPO_PREFIX):]
    if text.endswith(DAPO_SUFFIX):
        text = text[: -len(DAPO_SUFFIX)]
    return text.strip()


def render_prompt(problem: Problem, tokenizer=None, style: str = "dapo_chat") -> str:
    """The text the policy is conditioned on.

    dapo_chat: DAPO's instruction as one user turn of the tokenizer's chat template (the paper's setup,
               verl's default for Qwen3-Base too); dapo_raw: the instruction alone, no template (for
               base models without one); plain: "<problem>\\n" (the tiny demo model, whose short context
               makes DAPO's 60-word instruction pure cost).
    """
    if style == "dapo_chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt style 'dapo_chat' needs a tokenizer with a chat template; "
                             "use --prompt-style dapo_raw for a base model without one")
        return tokenizer.apply_chat_template([{"role": "user", "content": dapo_instruction(problem.problem)}],
                                             tokenize=False, add_generation_prompt=True)
    if style == "dapo_raw":
        return dapo_instruction(problem.problem) + "\n"
    if style == "plain":
        return problem.problem + "\n"
    raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")


def cycle_problems(problems: list, seed: int, cursor: int, count: int) -> list:
    """Problems cursor .. cursor+count-1 of an endless stream: one seeded permutation per epoch, so the order
    is fixed by (seed, cursor) alone and a resumed run draws exactly what the straight run would have."""
    import numpy as np
    out, perms = [], {}
    for j in range(cursor, cursor + count):
        epoch, k = divmod(j, len(problems))
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(len(problems))
        out.append(problems[int(perms[epoch][k])])
    return out


# ----------------------------------------------------------------------------- loading

def _rows(source: str, spec: Spec | None, path: str | None, split: str | None):
    """(rows as dicts, label for error messages), from a local file or the hub."""
    import datasets

    target = path or source
    ext = os.path.splitext(target)[1].lower()
    if path is not None or ext in LOCAL_EXTENSIONS or os.path.exists(target):
        if not os.path.isfile(target):
            raise DataError(f"data file not found: {target} (give a .jsonl, .json or .parquet file, or one of "
                            f"the names {sorted(BENCHMARKS)})")
        if ext not in LOCAL_EXTENSIONS:
            raise DataError(f"{target}: unsupported file type {ext!r}; use .jsonl, .json or .parquet")
        try:
            return datasets.load_dataset(LOCAL_EXTENSIONS[ext], data_files=target, split="train"), target
        except Exception as e:
            # datasets reports a bad line as "An error occurred while generating the dataset" or a byte offset
            where = _bad_json_line(target) if ext != ".parquet" else None
            raise DataError(f"{target}, {where}" if where else f"{target}: cannot be read as {ext[1:]}: "
                            f"{_innermost(e)}") from e
    if spec is None and "/" not in source:
        raise DataError(f"unknown data source {source!r}: not a file, not a hub id (org/name), and not one of "
                        f"{sorted(BENCHMARKS)}")
    hub_id, config = (source, None) if spec is None else (spec.hub_id, spec.config)
    label = source if spec is None else f"{source} ({hub_id})"
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError
    try:
        return datasets.load_dataset(hub_id, config, split=split or (spec.split if spec else "train")), label
    except (GatedRepoError, DatasetNotFoundError) as e:
        # datasets turns the hub's GatedRepoError into DatasetNotFoundError("... is a gated dataset ...")
        if isinstance(e, GatedRepoError) or "gated" in str(e):
            raise DataError(f"{label} is gated on the Hugging Face hub: accept its licence at "
                            f"https://huggingface.co/datasets/{hub_id} with your account, then log in with "
                            f"`hf auth login` (older hub versions: `huggingface-cli login`) or set HF_TOKEN") from e
        raise DataError(f"{label}: {_innermost(e)}") from e


def _innermost(e: BaseException) -> str:
    """The root cause's message on one line (datasets wraps the useful one in a generic one)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return " ".join(str(e).split()) or type(e).__name__


def _bad_json_line(path: str) -> str | None:
    """"line N: ..." for the first line of a JSON-lines file that is not one JSON object (1-based), else None.
    A file holding one JSON array is reported at the line where the array breaks."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        json.loads(data)
        return None                          # one valid JSON document: the trouble is elsewhere
    except ValueError as e:
        if data.lstrip()[:1] == b"[":
            return f"line {e.lineno}: not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) \
                else "not UTF-8 text"
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
        except ValueError:
            return f"line {n}: not UTF-8 text"
        if not isinstance(row, dict):
            return f"line {n}: expected a JSON object {{...}}, got {type(row).__name__}"
    return None


def _field(row: dict, name: str, label: str, i: int):
    """row[name] for dotted names ("reward_model.ground_truth"), or a DataError saying what is missing."""
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise DataError(f"{label}, row {i}: missing field '{name}' (fields present: {sorted(row)})")
        value = value[part]
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{label}, row {i}: field '{name}' is empty")
    return value


def _detect_schema(row: dict) -> Spec:
    if "prompt" in row and "reward_model" in row:
        return Spec("", None, "", "dapo")
    if "Question" in row and "Correct Answer" in row:
        return Spec("", None, "", "gpqa")
    problem_field = next((f for f in ("problem", "question", "Question") if f in row), "problem")
    answer_field = next((f for f in ("answer", "final_answer", "ground_truth") if f in row), "answer")
    return Spec("", None, "", "qa", problem_field=problem_field, answer_field=answer_field)


def _answer_text(value) -> str:
    if isinstance(value, (list, tuple)):      # OlympiadBench: a list of final answers (usually one)
        return ", ".join(str(v) for v in value)
    return str(value).strip()


def _gpqa_problem(row: dict, label: str, i: int, seed: int) -> tuple[str, str]:
    question = _field(row, "Question", label, i).strip()
    correct = _field(row, "Correct Answer", label, i).strip()
    options = [correct] + [_field(row, f"Incorrect Answer {k}", label, i).strip() for k in (1, 2, 3)]
    # A fixed shuffle per question (not per run), so every checkpoint sees the same letters.
    random.Random(seed * 1_000_003 + zlib.crc32(question.encode())).shuffle(options)
    letters = "ABCD"
    text = question + "\n\n" + "\n".join(f"{letters[k]}) {o}" for k, o in enumerate(options))
    text += "\n\nAnswer with the letter of the correct option."
    return text, letters[options.index(correct)]


def load_problems(source: str, *, path: str | None = None, split: str | None = None, limit: int | None = None,
                  seed: int = 0) -> list[Problem]:
    """Problems from a named benchmark, a hub id or a local file; validated, de-duplicated, in file order.

    source: a name from BENCHMARKS, a local .jsonl/.json/.parquet path, or a hub id "org/name".
    path:   read this local file in the schema of the named `source` (e.g. source="math500", path=...).
    limit:  keep the first `limit` problems (after de-duplication).
    seed:   the GPQA option shuffle.
    """
    spec = BENCHMARKS.get(source)
    rows, label = _rows(source, spec, path, split)
    if len(rows) == 0:
        raise DataError(f"{label}: no rows")
    if spec is None:                         # a file or hub id of our own: read its schema off its fields
        spec = _detect_schema(rows[0])
    name = source if source in BENCHMARKS else os.path.splitext(os.path.basename(source))[0]

    problems, seen = [], set()
    for i, row in enumerate(rows):
        solution = None
        if spec.schema == "dapo":
            prompt = _field(row, "prompt", label, i)
            if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) \
                    or not str(prompt[-1].get("content") or "").strip():
                raise DataError(f"{label}, row {i}: field 'prompt' must be a non-empty chat list whose last turn "
                                f"has a non-empty 'content'")
            text = strip_dapo_instruction(prompt[-1]["content"])
            answer = _answer_text(_field(row, "reward_model.ground_truth", label, i))
            extra = row.get("extra_info") or {}
            solution = extra.get("solution") if isinstance(extra, dict) else None
            pid = f"{row.get('data_source') or name}:{extra.get('index', i) if isinstance(extra, dict) else i}"
            src = row.get("data_source") or name
            is_choice = False
        elif spec.schema == "gpqa":
            text, answer = _gpqa_problem(row, label, i, seed)
            pid, src, is_choice = f"{name}:{row.get('Record ID', i)}", name, True
        else:
            text = str(_field(row, spec.problem_field, label, i)).strip()
            answer = _answer_text(_field(row, spec.answer_field, label, i))
            pid, src, is_choice = f"{name}:{row.get('id', row.get('unique_id', i))}", name, False
        if not answer:
            raise DataError(f"{label}, row {i}: the answer is empty")
        if text in seen:                     # DAPO-Math-17k repeats each prompt ~100 times
            continue
        seen.add(text)
        problems.append(Problem(text, answer, str(pid), str(src), is_choice, solution))
        if limit is not None and len(problems) >= limit:
            break
    return problems
