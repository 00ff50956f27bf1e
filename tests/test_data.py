"""common/data.py: every named benchmark's field mapping, on local files in the hub schema; bad rows."""
import json

import pytest

from common.data import (BENCHMARKS, DAPO_PREFIX, DAPO_SUFFIX, DataError, Problem, dapo_instruction,
                         load_problems, render_prompt, strip_dapo_instruction)


def _write(path, rows):
    if str(path).endswith(".parquet"):
        import datasets
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return str(path)


def _dapo_row(problem, answer, index):
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": dapo_instruction(problem)}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


def test_dapo17k_schema_parquet_is_deduplicated(tmp_path):
    # The real parquet repeats each prompt many times; the loader keeps one of each, in order.
    rows = [_dapo_row("What is 1+1?", "2", "a"), _dapo_row("Find x if 2x=6.", "3", "b")] * 5
    rows.append(_dapo_row("Compute $\\frac{1}{2}+\\frac{1}{2}$.", "1", "c"))
    problems = load_problems("dapo17k", path=_write(tmp_path / "dapo-math-17k.parquet", rows))
    assert [(p.problem, p.answer) for p in problems] == [
        ("What is 1+1?", "2"), ("Find x if 2x=6.", "3"), ("Compute $\\frac{1}{2}+\\frac{1}{2}$.", "1")]
    assert problems[0].source == "math_dapo" and problems[0].id == "math_dapo:a"


@pytest.mark.parametrize("name,row,problem,answer", [
    ("aime24", {"id": 60, "problem": "Find N.", "solution": "...", "answer": "204", "url": "u", "year": "2024"},
     "Find N.", "204"),
    ("aime25", {"problem": "Find M.", "answer": "70", "id": "0"}, "Find M.", "70"),
    ("amc23", {"id": 0, "question": "How many?", "answer": 27.0, "url": "u"}, "How many?", "27.0"),
    ("math500", {"problem": "Simplify $x$.", "solution": "s", "answer": "\\frac{1}{2}", "subject": "Algebra",
                 "level": 3, "unique_id": "test/algebra/1.json"}, "Simplify $x$.", "\\frac{1}{2}"),
    ("minerva", {"question": "Compute the mass.", "answer": "4.5e10", "type": "x", "idx": 3},
     "Compute the mass.", "4.5e10"),
    ("olympiadbench", {"id": 1606, "question": "Find all n.", "final_answer": ["$2$", "$3$"], "unit": None},
     "Find all n.", "$2$, $3$"),
])
def test_named_benchmark_mappings(tmp_path, name, row, problem, answer):
    path = _write(tmp_path / f"{name}.jsonl", [row])
    [p] = load_problems(name, path=path)
    assert (p.problem, p.answer, p.source, p.is_choice) == (problem, answer, name, False)
    # the same file without the name is read by schema detection to the same problem
    [q] = load_problems(path)
    assert (q.problem, q.answer) == (problem, answer)


def test_gpqa_options_shuffled_with_fixed_seed_and_graded_by_letter(tmp_path):
    rows = [{"Question": f"Which is right {i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3", "Record ID": f"r{i}"} for i in range(12)]
    path = _write(tmp_path / "gpqa.jsonl", rows)
    a = load_problems("gpqa_diamond", path=path)
    b = load_problems("gpqa_diamond", path=path)
    assert [p.problem for p in a] == [p.problem for p in b]        # same letters every run
    letters = set()
    for i, p in enumerate(a):
        assert p.is_choice and p.answer in "ABCD"
        assert f"{p.answer}) right{i}" in p.problem               # the letter points at the correct option
        letters.add(p.answer)
    assert len(letters) > 1                                        # shuffled, not always "A"


def test_synthetic_fixture_data_loads_unchanged(tiny):
    train = load_problems(tiny["train"])
    test = load_problems(tiny["test"])
    assert len(train) == 400 and len(test) == 64
    assert not {p.problem for p in train} & {p.problem for p in test}
    assert train[0].problem.startswith("What is ") and train[0].solution.endswith(f"Answer: {train[0].answer}")
    assert load_problems(tiny["train"], limit=10) == train[:10]


@pytest.mark.parametrize("row,field", [
    ({"question": "What?"}, "answer"),
    ({"problem": "", "answer": "1"}, "problem"),
    ({"problem": "What?", "answer": "  "}, "answer"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, field):
    good = {"problem": "ok", "answer": "1"}
    path = _write(tmp_path / "bad.jsonl", [good, good | {"problem": "ok2"}, row])
    with pytest.raises(DataError) as e:
        load_problems("math500", path=path)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "row 2" in msg and field in msg


def test_bad_dapo_rows(tmp_path):
    row = _dapo_row("p", "1", 0)
    del row["reward_model"]["ground_truth"]
    with pytest.raises(DataError, match=r"row 0.*reward_model.ground_truth"):
        load_problems("dapo17k", path=_write(tmp_path / "d.jsonl", [row]))
    row = _dapo_row("p", "1", 0) | {"prompt": []}
    with pytest.raises(DataError, match=r"row 0.*prompt"):
        load_problems("dapo17k", path=_write(tmp_path / "d2.jsonl", [row]))


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown data source"):
        load_problems("not_a_benchmark")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_problems(str(tmp_path / "x.csv"))


def test_render_prompt_styles(tiny):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    p = Problem("What is 2+2?", "4", "x:0", "x")
    chat = render_prompt(p, tok, "dapo_chat")
    assert chat.startswith("<|im_start|>user\n" + DAPO_PREFIX) and chat.endswith(DAPO_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(p, tok, "dapo_raw") == dapo_instruction("What is 2+2?") + "\n"
    assert render_prompt(p, None, "plain") == "What is 2+2?\n"
    assert strip_dapo_instruction(dapo_instruction("  x  ")) == "x"
    with pytest.raises(ValueError, match="unknown prompt style"):
        render_prompt(p, tok, "fancy")


def test_registry_covers_the_papers_benchmarks():
    assert {"dapo17k", "aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "gpqa_diamond"} <= set(BENCHMARKS)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    good = json.dumps({"problem": "ok", "answer": "1"})
    path = tmp_path / "broken.jsonl"
    path.write_text(f"{good}\n{good}\n" + '{"problem": "p", "answer": \n' + f"{good}\n")
    with pytest.raises(DataError, match=r"^\S*broken\.jsonl, line 3: not valid JSON") as e:
        load_problems(str(path))
    assert "\n" not in str(e.value)
    path.write_text(f"{good}\n\n[1, 2]\n")                       # blank lines count; a list is not a row
    with pytest.raises(DataError, match=r"broken\.jsonl, line 3: expected a JSON object"):
        load_problems(str(path))
    array = tmp_path / "broken.json"                             # one JSON array: the line where it breaks
    array.write_text(f"[{good},\n" + '{"problem": "p" "answer": "2"}]\n')
    with pytest.raises(DataError, match=r"broken\.json, line 2: not valid JSON"):
        load_problems(str(array))
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot be read as parquet"):
        load_problems(str(bad_parquet))


def _gated_error():
    import httpx2
    from huggingface_hub.errors import GatedRepoError
    request = httpx2.Request("GET", "https://huggingface.co/datasets/Idavidrein/gpqa/resolve/main/README.md")
    return GatedRepoError("401 Client Error. Cannot access gated repo.", response=httpx2.Response(401, request=request))


@pytest.mark.parametrize("error", [
    _gated_error,                                                # what huggingface_hub raises while downloading
    # what datasets makes of it while resolving the dataset (the hub's error is dropped from the chain)
    lambda: __import__("datasets").exceptions.DatasetNotFoundError(
        "Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. You must be authenticated to access it."),
])
def test_gated_gpqa_says_how_to_get_access(monkeypatch, error):
    import datasets

    def load_dataset(*args, **kwargs):
        raise error()
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as e:
        load_problems("gpqa_diamond")
    msg = str(e.value)
    assert "gated" in msg and "https://huggingface.co/datasets/Idavidrein/gpqa" in msg
    assert "licence" in msg and "hf auth login" in msg and "HF_TOKEN" in msg and "\n" not in msg


def test_cycle_problems_is_one_seeded_permutation_per_epoch_and_the_cursor_continues_it():
    """The training stream (rl_dapo.py and reheat_tsopsd.py draw their prompts from it): over two epochs every
    problem comes once per epoch, the two epochs in different orders; the order is fixed by (seed, cursor) alone,
    another seed gives another; and drawing from an advanced cursor continues the stream (what a resumed run and
    every next generation batch rely on)."""
    from common.data import cycle_problems
    problems = [f"p{i}" for i in range(10)]
    stream = cycle_problems(problems, 7, 0, 20)
    first, second = stream[:10], stream[10:]
    assert sorted(first) == sorted(second) == sorted(problems)            # each problem once per epoch
    assert first != second and first != problems                          # each epoch its own shuffle
    assert cycle_problems(problems, 7, 0, 20) == stream                    # fixed by the seed ...
    assert cycle_problems(problems, 8, 0, 20) != stream                    # ... and only by it
    for cursor, count in ((0, 3), (3, 4), (7, 6), (13, 7), (10, 10)):      # ... and the cursor: a continuation
        assert cycle_problems(problems, 7, cursor, count) == stream[cursor:cursor + count], (cursor, count)
    pieces = [cycle_problems(problems, 7, c, 3) for c in range(0, 18, 3)]  # batches of 3 drawn one after another
    assert sum(pieces, []) == stream[:18]
    assert cycle_problems(problems, 7, 20, 10) not in (first, second)      # a third epoch, a third order
