"""Instruction tuning (task sft): answer-only labels, the chat template, packing, the
generation score, a module's own score, and bad input refused before any trial."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hpo import space
from hpo.errors import HpoError
from hpo.train import sft, worker_cache
from hpo.train.evaluation import evaluate
from hpo.train.recipe import TrainJob
from tests.conftest import SEARCH_SPACES, run_hpo

DATES = SEARCH_SPACES / "data" / "dates"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    return worker_cache.load_tokenizer(str(tiny_llama))


def job_for(tiny_llama: Path, *overrides: str) -> TrainJob:
    loaded = space.load(SEARCH_SPACES / "sft_lora.py", [f"model={tiny_llama}", *overrides])
    return TrainJob.from_sweep(loaded.sweep, {"batch_size": 4})


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_labels_only_the_answer(tokenizer) -> None:
    messages = sft._pair("x.jsonl", 0, "Write the date March 5, 2021 as YYYY-MM-DD.", "2021-03-05")
    example = sft.tokenize(messages, tokenizer, tokenizer.chat_template, max_length=512)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert example.input_ids == ids_of(tokenizer, whole)
    n_prompt = len(ids_of(tokenizer, prompt))
    assert example.labels[:n_prompt] == [-100] * n_prompt  # every prompt token, the system turn included
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert tokenizer.decode(example.input_ids[n_prompt:]) == "2021-03-05<|im_end|>\n"


def test_multi_turn_messages_label_every_assistant_turn_and_nothing_else(tokenizer) -> None:
    messages = [{"role": "system", "content": "Answer in ISO dates."},
                {"role": "user", "content": "March 5, 2021?"}, {"role": "assistant", "content": "2021-03-05"},
                {"role": "user", "content": "And the day after?"}, {"role": "assistant", "content": "2021-03-06"}]
    example = sft.tokenize(messages, tokenizer, tokenizer.chat_template, max_length=512)
    # Built independently: the template's text turn by turn, each turn tokenized on its own.
    expected_ids, expected_labels = [], []
    for message in messages:
        turn = f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
        if message["role"] == "assistant":
            head, answer = ids_of(tokenizer, "<|im_start|>assistant\n"), ids_of(tokenizer, f"{message['content']}<|im_end|>\n")
            expected_ids += head + answer
            expected_labels += [-100] * len(head) + answer
        else:
            expected_ids += ids_of(tokenizer, turn)
            expected_labels += [-100] * len(ids_of(tokenizer, turn))
    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    learned = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert tokenizer.decode(learned) == "2021-03-05<|im_end|>\n2021-03-06<|im_end|>\n"


def test_reading_both_formats_and_the_chat_template_field(tiny_llama: Path, tokenizer, tmp_path: Path) -> None:
    pairs, chats = sft.read(str(DATES / "train.jsonl")), sft.read(str(DATES / "eval.jsonl"))
    assert len(pairs) == 400 and len(chats) == 60
    assert [m["role"] for m in pairs[0]] == ["user", "assistant"] == [m["role"] for m in chats[0]]
    csv = tmp_path / "chats.csv"
    csv.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"\n')
    assert sft.read(str(csv)) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]

    own = tmp_path / "plain.jinja"
    own.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")
    job = job_for(tiny_llama, f"chat_template={own}")
    train, evaluation = sft.datasets(job, tokenizer)
    assert tokenizer.decode(train.examples[0].input_ids).startswith("user: What is the 20th of July 2004")
    assert tokenizer.decode(evaluation.prompts[0]).endswith("Answer with the date only.\nassistant: ")
    default = sft.datasets(job_for(tiny_llama), tokenizer)[0]
    assert tokenizer.decode(default.examples[0].input_ids).startswith("<|im_start|>system\n")


def test_packing_keeps_labels_and_attention_within_each_example(tiny_llama: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    job = job_for(tiny_llama, "max_length=256")
    plain = sft.datasets(job, tokenizer)[0].examples
    packed = sft.datasets(job.with_settings(packing=True), tokenizer)[0].examples
    assert len(packed) < len(plain) / 2 and all(len(b.input_ids) <= 256 for b in packed)
    assert sum((b.input_ids for b in packed), []) == sum((e.input_ids for e in plain), [])
    assert sum((b.labels for b in packed), []) == sum((e.labels for e in plain), [])
    eos = tokenizer.eos_token_id
    first = packed[0]
    starts = [i for i, p in enumerate(first.position_ids) if p == 0]
    assert len(starts) >= 2 and all(eos in first.input_ids[s - 2 : s] for s in starts[1:])  # <|im_end|>\n between

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False
    dataset = sft.SftSet(packed, tokenizer.pad_token_id)
    with torch.no_grad():
        together = model(**sft.collate(dataset, [0, 1])).logits[0]
        for start, example in zip(starts, plain, strict=False):
            alone = model(**sft.collate(sft.SftSet([example], tokenizer.pad_token_id), [0])).logits[0]
            torch.testing.assert_close(together[start : start + len(example.input_ids)], alone, atol=1e-5, rtol=1e-4)


def test_generation_score_exact_match_and_a_module_score(tiny_llama: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    job = job_for(tiny_llama, "generation_examples=6", "max_new_tokens=5")
    evaluation = sft.datasets(job, tokenizer)[1]
    assert len(evaluation.prompts) == 6 and evaluation.references[0] == sft.read(str(DATES / "eval.jsonl"))[0][1]["content"]
    # Reference answers: the model's own greedy output, one prompt at a time (no padding).
    alone = []
    for prompt in evaluation.prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
        alone.append(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True))
    batched = sft.generate(model, tokenizer, evaluation.prompts, 5, batch_size=4, pad_id=tokenizer.pad_token_id)
    assert [a.text for a in batched] == alone  # left padding changes nothing
    references = [f"  {a} " if i % 2 else "not it" for i, a in enumerate(alone)]
    lengths = lambda prediction, reference: float(len(prediction) == len(reference.strip()))  # noqa: E731
    scored = sft.with_score(dataclasses.replace(evaluation, references=references), lengths)
    metrics = evaluate(job, model, tokenizer, scored)
    assert metrics["eval_exact_match"] == pytest.approx(0.5)  # stripped matches only
    assert metrics["eval_score"] == pytest.approx(sum(lengths(a, r) for a, r in zip(alone, references, strict=True)) / 6)
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)


def write_module(folder: Path, model: Path, train: Path, extra: str = "", score: bool = False) -> Path:
    module = folder / "tiny_sft.py"
    module.write_text(f'''import hpo

sweep = hpo.Sweep(model={str(model)!r}, task="sft", train_data={str(train)!r}, eval_data={str(DATES / "eval.jsonl")!r},
                  metric="eval_loss", trials=3, max_steps=4, eval_every=2, max_length=96, generation_examples=4,
                  max_new_tokens=12, reduction_factor=2, eval_batch_size=16, {extra})


def space(trial):
    return {{"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True), "batch_size": 4}}
''' + ("\n\ndef score(prediction, reference):\n    return 0.25\n" if score else ""))
    return module


def test_bad_sft_input_is_refused_before_any_trial(tiny_llama: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    result = run_hpo(["search", str(write_module(tmp_path, tiny_llama, wrong))], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "wrong.jsonl" in lines[0] and "`prompt` and `completion`" in lines[0]
    assert "messages" in lines[0] and "question, answer" in lines[0]
    assert not (tmp_path / "hpo.db").exists() and not (tmp_path / "mlflow.db").exists()

    bare = tmp_path / "bare-llama"
    for item in tiny_llama.iterdir():
        if item.name != "chat_template.jinja":
            (bare / item.name).parent.mkdir(exist_ok=True)
            (bare / item.name).write_bytes(item.read_bytes())
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_hpo(["search", str(write_module(tmp_path, bare, DATES / "train.jsonl"))], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "no chat template" in line and "--set chat_template=" in line
    assert not (tmp_path / "hpo.db").exists()
    fixed = space.load(write_module(tmp_path, bare, DATES / "train.jsonl"), [f"chat_template={tiny_llama / 'chat_template.jinja'}"])
    sft.check(fixed.sweep)  # the --set the message names is the fix
    with pytest.raises(HpoError, match="no such file"):
        sft.chat_template("m", None, str(tmp_path / "missing.jinja"))


def test_a_generation_metric_needs_generation_and_eval_score_a_score(tiny_llama: Path, tmp_path: Path) -> None:
    from hpo.run.sweep import SearchOptions, prepare

    with pytest.raises(HpoError, match="generation_examples=0 leaves nothing"):
        space.load(SEARCH_SPACES / "sft_lora.py", ["generation_examples=0"])
    module = write_module(tmp_path, tiny_llama, DATES / "train.jsonl", extra='direction="maximize"')
    with pytest.raises(HpoError, match="metric eval_score needs a function score"):
        prepare(SearchOptions(str(module), overrides=["metric=eval_score"]))
    with_score = write_module(tmp_path, tiny_llama, DATES / "train.jsonl", score=True)
    assert prepare(SearchOptions(str(with_score), overrides=["metric=eval_score"])).score("a", "b") == 0.25
