"""Data checks for task sft: each planted problem in real JSONL files is found with its code,
severity, count and rows; through ``hpo check-data --json`` and ``hpo search`` too."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from hpo import HpoError
from hpo.analysis.checks import DataReport, check_data
from hpo.run.sweep import SearchOptions, prepare
from hpo.train import data, sft
from tests.conftest import SEARCH_SPACES, run_hpo
from tests.test_checks import _codes, _only

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
Pair = tuple[str, str]


def _pairs(start: int, count: int) -> list[Pair]:
    """Distinct prompts of ten words (13 tokens by the estimate), one-word answers."""
    return [(f"Write day {i % 28 + 1} of {MONTHS[i % 12]} in year {1900 + i} as ISO.",
             f"{1900 + i}-{i % 12 + 1:02d}-{i % 28 + 1:02d}") for i in range(start, start + count)]


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _write(path: Path, rows: list) -> str:
    """``(prompt, completion)`` pairs as prompt/completion JSONL; lists of messages as a messages column."""
    lines = [json.dumps({"messages": row} if isinstance(row, list) else {"prompt": row[0], "completion": row[1]})
             for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _files(tmp_path: Path, train: list, evaluation: list | None = None) -> tuple[str, str | None]:
    train_file = _write(tmp_path / "train.jsonl", train)
    return train_file, (_write(tmp_path / "eval.jsonl", evaluation) if evaluation is not None else None)


def _check(files: tuple[str, str | None], **settings) -> DataReport:
    return check_data(*files, task="sft", **settings)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_clean_files_have_no_findings(tmp_path: Path, tokenizer) -> None:
    files = _files(tmp_path, _pairs(0, 100), [_chat(*pair) for pair in _pairs(1000, 20)])
    report = _check(files)
    assert report.findings == [] and report.lines()[-1] == "0 errors, 0 warnings: ready for a sweep"
    train = report.stats["train"]
    assert (train["rows"], report.stats["eval"]["rows"]) == (100, 20)
    assert train["prompt_tokens"] == {"p50": 13, "p95": 13, "max": 13} and train["answer_tokens"]["max"] == 1
    assert train["loss_token_share"] == pytest.approx(1 / 14, abs=1e-4)
    assert report.lines()[0].startswith("train: 100 conversations (") and "7.1% of the tokens seen carry loss" \
        in report.lines()[0]

    exact = _check(files, tokenizer=tokenizer, max_length=512)
    assert exact.findings == [] and exact.stats["token_counts"] == "tokenizer and chat template"
    prompt, answer = _pairs(0, 1)[0]
    head = tokenizer.apply_chat_template(_chat(prompt, answer)[:1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(_chat(prompt, answer), tokenize=False)
    assert exact.stats["train"]["answer_tokens"]["max"] == len(_ids(tokenizer, f"{answer}<|im_end|>\n"))
    assert len(_ids(tokenizer, head)) + len(_ids(tokenizer, f"{answer}<|im_end|>\n")) == len(_ids(tokenizer, whole))


def test_no_answer_and_turns_after_the_answer(tmp_path: Path) -> None:
    rows = [_chat(*pair) for pair in _pairs(0, 50)]
    rows[2] = rows[2][:1]                                    # row 3: the user asks, nobody answers
    rows[6] = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Date of today?"}]
    rows[8] = rows[8] + [{"role": "user", "content": "Thanks!"}]  # row 9: goes on after its answer
    train, evaluation = _files(tmp_path, rows, [_chat(*pair) for pair in _pairs(1000, 10)])
    with pytest.raises(HpoError, match="row 3: no assistant message"):
        sft.read(train)  # training stops at the first
    report = _check((train, evaluation))
    missing = _only(report, "no_answer")
    assert (missing.severity, missing.count, missing.rows) == ("error", 2, [3, 7])
    trailing = _only(report, "answer_not_last")
    assert (trailing.severity, trailing.count, trailing.rows) == ("warning", 1, [9])
    assert "row 9 ends with a 'user' turn" in trailing.message
    assert _codes(report) == {"no_answer", "answer_not_last"}
    assert report.lines()[0].startswith("error: ") and report.lines()[-1].endswith("not ready for a sweep")


@pytest.mark.parametrize(("planted", "severity"), [((5, 17), "warning"), ((5, 17, 60), "error")])
def test_empty_prompts_and_answers(tmp_path: Path, planted: tuple[int, ...], severity: str) -> None:
    rows: list = [_chat(*pair) for pair in _pairs(0, 200)]
    for number in planted:  # 2 of 200 is 1%: a warning; 3 is above 1%: an error
        prompt, answer = _pairs(number - 1, 1)[0]
        rows[number - 1] = _chat(prompt, "  ")
        rows[number + 99] = [{"role": "system", "content": f"Answer in ISO dates ({number})."}, *_chat("", answer)]
    report = _check(_files(tmp_path, rows, [_chat(*pair) for pair in _pairs(1000, 20)]))
    answers, prompts = _only(report, "empty_answer"), _only(report, "empty_prompt")
    assert (answers.severity, answers.count, answers.rows) == (severity, len(planted), list(planted))
    assert (prompts.severity, prompts.count, prompts.rows) == (severity, len(planted), [n + 100 for n in planted])
    assert f"{len(planted)} of 200 conversations" in answers.message
    assert _codes(report) == {"empty_answer", "empty_prompt"}


def test_duplicate_near_duplicate_and_conflicting_answers(tmp_path: Path) -> None:
    rows: list = _pairs(0, 100)
    rows[9] = rows[29] = rows[2]                                   # rows 10, 30 repeat row 3 exactly
    rows[39] = ("WRITE day 7 of July in year 1906, as ISO!", rows[6][1])  # row 40 ~ row 7
    rows[11] = (rows[3][0], "1999-01-01")                          # row 12: row 4's prompt, another answer
    report = _check(_files(tmp_path, rows, _pairs(1000, 20)))
    duplicate = _only(report, "duplicate")
    assert (duplicate.severity, duplicate.count, duplicate.rows) == ("warning", 3, [10, 12, 30])
    assert "3 of 100 prompts repeat an earlier one exactly (row 10 = row 3)" in duplicate.message
    near = _only(report, "near_duplicate")
    assert (near.severity, near.count, near.rows) == ("warning", 1, [40]) and "row 40 ~ row 7" in near.message
    conflict = _only(report, "conflicting_answers")
    assert (conflict.severity, conflict.count, conflict.rows) == ("warning", 2, [4, 12])
    assert "row 4 answers '1903-04-04', row 12 '1999-01-01'" in conflict.message
    assert _codes(report) == {"duplicate", "near_duplicate", "conflicting_answers"}


@pytest.mark.parametrize(("eval_rows", "severity"), [(40, "warning"), (10, "error")])
def test_leakage_between_files(tmp_path: Path, eval_rows: int, severity: str) -> None:
    train = _pairs(0, 100)
    evaluation = [_chat(*pair) for pair in _pairs(1000, eval_rows)]
    evaluation[1] = _chat(*train[50])
    evaluation[4] = _chat(train[60][0].upper(), "a different answer")  # the prompt leaks, whatever the answer
    report = _check(_files(tmp_path, train, evaluation))
    finding = _only(report, "leakage")
    assert (finding.severity, finding.count, finding.rows) == (severity, 2, [2, 5])
    assert finding.source.endswith("eval.jsonl") and f"2 of {eval_rows} validation prompts" in finding.message


def test_leakage_into_the_held_out_split(tmp_path: Path) -> None:
    rows = _pairs(0, 200)
    kept, held = data.hold_out_rows("train.jsonl", len(rows), 0.1)  # as hpo.train.sft.datasets holds out
    rows[held[0]] = rows[kept[0]]
    report = _check(_files(tmp_path, rows), eval_fraction=0.1)
    finding = _only(report, "leakage")
    assert (finding.severity, finding.count, finding.rows) == ("warning", 1, [held[0] + 1])
    assert "1 of 20 held-out validation prompts" in finding.message and finding.source.endswith("train.jsonl")
    assert report.stats["train"]["rows"] == 180 and report.stats["eval"]["rows"] == 20


def test_answers_lost_or_cut_at_max_length_with_the_chat_template(tmp_path: Path, tokenizer) -> None:
    rows = _pairs(0, 60)
    filler = " ".join(f"word{i}" for i in range(40))
    for number in (4, 21):   # the prompt alone fills max_length: no answer token is left
        rows[number - 1] = (f"{rows[number - 1][0]} {filler}", rows[number - 1][1])
    for number in (9, 33, 50):  # the answer starts within max_length and ends past it
        rows[number - 1] = (rows[number - 1][0], f"{rows[number - 1][1]} because {filler}")

    def lengths(pair: Pair) -> tuple[int, int]:  # prompt (with the assistant header) and whole, rendered
        head = tokenizer.apply_chat_template(_chat(*pair)[:1], tokenize=False, add_generation_prompt=True)
        return len(_ids(tokenizer, head)), len(_ids(tokenizer, tokenizer.apply_chat_template(_chat(*pair),
                                                                                         tokenize=False)))

    max_length = 80
    sizes = [lengths(pair) for pair in rows]
    assert all(head >= max_length for head, _ in (sizes[3], sizes[20]))
    assert all(head < max_length < whole for head, whole in (sizes[8], sizes[32], sizes[49]))
    assert sum(whole > max_length for _, whole in sizes) == 5, "the other rows fit"

    files = _files(tmp_path, rows, _pairs(1000, 10))
    report = _check(files, tokenizer=tokenizer, max_length=max_length)
    lost = _only(report, "answer_lost")
    assert (lost.severity, lost.count, lost.rows) == ("error", 2, [4, 21])  # 2 of 60: above 1%
    assert "training drops them and learns nothing" in lost.message
    cut = _only(report, "answer_cut")
    assert (cut.severity, cut.count, cut.rows) == ("warning", 3, [9, 33, 50])
    assert f"row 9 keeps {max_length - sizes[8][0]} of {sizes[8][1] - sizes[8][0]} answer tokens" in cut.message
    truncated = _only(report, "truncated")
    assert (truncated.severity, truncated.count, truncated.rows) == ("warning", 5, [4, 9, 21, 33, 50])
    assert "(tokenizer and chat template; longest" in truncated.message
    # what training keeps: every labelled token within max_length, as the share says
    examples = [sft.tokenize(m, tokenizer, tokenizer.chat_template, max_length) for m in sft.read(files[0])]
    assert len(sft._labelled(files[0], examples)) == 58  # training drops the two
    labelled = sum(sum(label != sft.IGNORE for label in e.labels) for e in examples)
    seen = sum(len(e.input_ids) for e in examples)
    assert report.stats["train"]["loss_token_share"] == round(labelled / seen, 4)


def test_answers_lost_by_the_word_estimate(tmp_path: Path) -> None:
    rows = _pairs(0, 300)
    rows[6] = (rows[6][0] + " and more" * 20, rows[6][1])  # 50 words: 65 tokens of prompt
    report = _check(_files(tmp_path, rows, _pairs(1000, 10)), max_length=40)
    lost = _only(report, "answer_lost")
    assert (lost.severity, lost.count, lost.rows) == ("warning", 1, [7])  # 1 of 300: a warning
    assert _only(report, "truncated").severity == "info"
    assert report.stats["token_counts"].startswith("approximate: 1.3 tokens per word")


SFT_MODULE = '''import hpo

sweep = hpo.Sweep(model=MODEL, task="sft", train_data="train.jsonl", eval_data="eval.jsonl", metric="eval_loss",
                  trials=2, max_steps=2, eval_every=1, max_length=96, generation_examples=2, max_new_tokens=2)


def space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True), "batch_size": 4}
'''


def _bad_sft_module(tmp_path: Path, tiny_llama: Path) -> Path:
    """A module on train.jsonl with two errors (rows 5 and 12) and eval.jsonl with a leaked prompt (row 2)."""
    rows: list = [_chat(*pair) for pair in _pairs(0, 60)]
    rows[4] = _chat(rows[4][0]["content"], "")            # row 5: an empty answer (1 of 60: an error)
    rows[11] = rows[11][:1]                                # row 12: no answer
    rows[20] = _chat(*_pairs(1001, 1)[0])                  # row 21: the prompt of eval row 2
    _files(tmp_path, rows, [_chat(*pair) for pair in _pairs(1000, 10)])
    module = tmp_path / "tiny_sft.py"
    module.write_text(SFT_MODULE.replace("MODEL", repr(str(tiny_llama))))
    return module


def test_check_data_json_on_an_sft_module(tmp_path: Path, tiny_llama: Path) -> None:
    result = run_hpo(["check-data", str(_bad_sft_module(tmp_path, tiny_llama)), "--json"], cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    found = {f["code"]: (f["severity"], f["rows"]) for f in report["findings"]}
    assert found == {"no_answer": ("error", [12]), "empty_answer": ("error", [5]), "leakage": ("warning", [2])}
    assert report["stats"]["task"] == "sft" and report["stats"]["token_counts"] == "tokenizer and chat template"
    assert report["stats"]["train"]["rows"] == 60 and not report["ok"] and report["errors"] == 2


def test_search_refuses_bad_sft_data_with_nothing_written(tmp_path: Path, tiny_llama: Path) -> None:
    search = run_hpo(["search", str(_bad_sft_module(tmp_path, tiny_llama))], cwd=tmp_path, timeout=120)
    assert search.returncode == 2, search.stdout + search.stderr
    assert "the data check found 2 error(s)" in search.stderr and "(rows 12)" in search.stderr
    assert "`hpo check-data tiny_sft.py`" in search.stderr
    assert not (tmp_path / "hpo.db").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / ".hpo").exists(), "nothing written, Ray never started"


def test_search_shows_warnings_and_skip_data_check_bypasses(tmp_path: Path, tiny_llama: Path) -> None:
    rows: list = [_chat(*pair) for pair in _pairs(0, 200)]
    for number in (5, 17, 60):  # 1.5% empty answers: an error, but hpo.train.sft.read accepts them
        rows[number - 1] = _chat(rows[number - 1][0]["content"], "")
    rows[99] = rows[98]  # a duplicate: a warning
    _files(tmp_path, rows, [_chat(*pair) for pair in _pairs(1000, 10)])
    module = tmp_path / "tiny_sft.py"
    module.write_text(SFT_MODULE.replace("MODEL", repr(str(tiny_llama))))
    with pytest.raises(HpoError, match=r"the data check found 1 error\(s\).*rows 5, 17, 60"):
        prepare(SearchOptions(str(module)))
    shown = io.StringIO()
    prepare(SearchOptions(str(module), skip_data_check=True), Console(file=shown))
    assert shown.getvalue() == ""
    for number in (5, 17, 60):
        rows[number - 1] = _chat(*_pairs(number + 500, 1)[0])
    _files(tmp_path, rows, [_chat(*pair) for pair in _pairs(1000, 10)])
    prepare(SearchOptions(str(module)), Console(file=shown, width=400))
    assert shown.getvalue().startswith("data warning: ") and "1 of 200 prompts repeat an earlier one" in shown.getvalue()


def test_shipped_dates_are_clean(tokenizer) -> None:
    train, evaluation = (str(SEARCH_SPACES / f"data/dates/{name}.jsonl") for name in ("train", "eval"))
    for report in (_check((train, evaluation), max_length=96), _check((train, None), max_length=96),
                   _check((train, evaluation), max_length=96, tokenizer=tokenizer)):
        assert not report.errors and not report.warnings, report.lines()
    assert report.stats["train"]["rows"] == 400 and report.stats["eval"]["rows"] == 60
