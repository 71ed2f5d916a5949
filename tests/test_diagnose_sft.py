"""Chat-model failures and unstable steps: what the generated answers show (unfinished,
repeating, wrong format, failing the score), forgetting on a retain set, loss spikes and
gradient blow-ups -- each fault planted, recorded by the real recipe on a tiny model, and
found by ``hpo diagnose``'s rules with its numbers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from hpo import Sweep
from hpo.analysis import diagnose_sft
from hpo.analysis.diagnose import diagnose_curves
from hpo.errors import HpoError
from hpo.train import answers, sft, training, worker_cache
from hpo.train.recipe import TrainJob
from tests.conftest import SEARCH_SPACES

DATES = SEARCH_SPACES / "data" / "dates"
REVIEWS = SEARCH_SPACES / "data" / "reviews"


def kinds(curves: dict) -> list[str]:
    return [finding.kind for finding in diagnose_sft.step_findings(curves)]


def evidence(curves: dict, kind: str) -> dict:
    return next(f.evidence for f in diagnose_sft.step_findings(curves) if f.kind == kind)


def at(values: list[float], every: int = 10) -> list[list[float]]:
    return [[every * (i + 1), v] for i, v in enumerate(values)]


# --- what the answers show -----------------------------------------------------------------

def test_answer_stats_from_generated_tokens() -> None:
    decode = lambda tokens: " ".join(map(str, tokens))  # noqa: E731
    ended = answers.answer([5, 6, 7, 2, 0, 0], {2}, decode)
    assert ended == answers.Answer("5 6 7", [5, 6, 7], True)  # cut at the end token, padding after it dropped
    early = answers.answer([1, 2, 3, 4] * 3, {2, 99}, decode)
    assert early.tokens == [1] and early.ended  # any of the end ids ends it
    unfinished = answers.answer([1, 3, 4, 5] * 3, {2}, decode)
    assert not unfinished.ended and len(unfinished.tokens) == 12
    assert answers.repetition(unfinished.tokens) == pytest.approx(1 - 4 / 9)  # 9 4-grams, 4 of them distinct
    assert answers.repetition([1, 2, 3]) == 0.0 == answers.repetition(list(range(20)))

    date = answers.Answer("2021-03-05", [1, 2, 3], True)
    words = answers.Answer("It is 2021-03-05", [7, 8, 9, 7, 8, 9, 7, 8], False)
    stats = answers.stats([date, words, words], [10, 10, 40], max_new_tokens=12, answer_format=r"\d{4}-\d{2}-\d{2}",
                          scores=[1.0, 0.0, 0.5])
    assert stats == {"eval_repetition": pytest.approx((0 + 0.4 + 0.4) / 3),  # 5 4-grams, 3 distinct
                     "eval_unfinished": 0.5,  # the third answer's reference (40 tokens) cannot fit in 12
                     "eval_format_fail": pytest.approx(2 / 3), "eval_score_fail": pytest.approx(1 / 3)}
    assert set(answers.stats([date], [40], 12, None, None)) == {"eval_repetition"}


def test_the_retain_score_ignores_case_punctuation_and_surrounding_words() -> None:
    assert answers.contains("The capital of France is Paris.", "paris") == 1.0
    assert answers.contains("It is carbon  dioxide!", "Carbon dioxide") == 1.0
    assert answers.contains("Parisian food", "Paris") == 0.0  # whole words only
    assert answers.contains("anything", "...") == 0.0  # a reference with no words matches nothing


# --- the rules on recorded numbers ---------------------------------------------------------

@pytest.mark.parametrize(("curve", "values", "kind", "bar"), [
    ("eval_unfinished", [1.0, 0.6, 0.3], "never_stops", diagnose_sft.UNFINISHED_SHARE),
    ("eval_repetition", [0.5, 0.3, 0.25], "repeats", diagnose_sft.REPETITION_LEVEL),
    ("eval_format_fail", [1.0, 0.5, 0.25], "wrong_format", diagnose_sft.FORMAT_FAIL_SHARE),
    ("eval_score_fail", [1.0, 0.9, 0.5], "failing_score", diagnose_sft.SCORE_FAIL_SHARE),
])
def test_each_answer_fault_is_judged_on_the_last_evaluation(curve: str, values: list[float], kind: str,
                                                            bar: float) -> None:
    found = evidence({curve: at(values)}, kind)
    assert found["step"] == 30 and found[curve] == values[-1] and found[f"first_{curve}"] == values[0]
    message = next(f.message for f in diagnose_sft.step_findings({curve: at(values)}))
    assert "at step 30" in message and "at step 10" in message
    assert kinds({curve: at([*values[:-1], bar - 0.01])}) == []  # just under the bar at the end: nothing
    assert kinds({curve: at([0.0, bar])}) == [kind]


def test_forgetting_is_a_drop_from_the_base_models_retain_scores() -> None:
    def retain(score: float, loss: float) -> dict:
        return {"retain_score": at([0.8, 0.75, score]), "retain_loss": at([1.3, 1.4, loss]),
                "retain_score_before": at([0.8] * 3), "retain_loss_before": at([1.2] * 3)}

    found = evidence(retain(0.6, 1.4), "forgetting")
    assert found == {"step": 30, "retain_score_before": 0.8, "retain_score": 0.6, "score_drop": 0.2,
                     "retain_loss_before": 1.2, "retain_loss": 1.4}
    assert kinds(retain(0.7, 1.1)) == ["forgetting"]  # the bar: 0.1 lost, whatever the loss did
    assert kinds(retain(0.75, 3.0)) == []  # 0.05 lost: the loss alone is no bar
    assert kinds({"retain_score": at([0.1])}) == []  # no base model's scores: nothing to compare


def test_loss_spikes_and_gradient_blowups_on_recorded_numbers() -> None:
    train = [2.0, 1.2, 1.0, 0.9, 0.85]
    smooth = {"train_loss": at(train), "train_loss_max": at([3.1, 1.9, 1.6, 1.4, 1.3]),
              "grad_norm": at([0.8, 0.6, 0.55, 0.6, 0.62]), "grad_norm_max": at([2.5, 1.2, 1.3, 1.5, 1.4])}
    assert kinds(smooth) == []  # a first interval far above the rest is how training starts
    spiked = {**smooth, "train_loss_max": at([3.1, 1.9, 1.6, 7.0, 1.3]), "grad_norm_max": at([2.5, 1.2, 1.3, 15.0, 1.4])}
    assert kinds(spiked) == ["loss_spikes", "gradient_blowup"]
    spike = evidence(spiked, "loss_spikes")
    assert spike == {"step": 40, "after_step": 30, "train_loss_max": 7.0, "train_loss_before": 1.0, "ratio": 7.0,
                     "start_train_loss": 2.0, "spike_steps": [40]}
    assert kinds({**spiked, "train_loss_max": at([3.1, 1.9, 1.6, 5.9, 1.3])}) == ["gradient_blowup"]  # < 3x the start
    blowup = evidence(spiked, "gradient_blowup")
    assert blowup["step"] == 40 and blowup["grad_norm_before"] == 0.6 and blowup["ratio"] == 25.0
    late = {"train_loss": at([2.0, 0.5, 0.1, 0.05, 0.04]), "train_loss_max": at([3.0, 1.0, 0.3, 0.2, 0.2]),
            "grad_norm": at([0.8, 0.1, 0.1, 0.1, 0.1]), "grad_norm_max": at([12.0, 0.5, 0.4, 2.5, 0.3])}
    # 4x a small late mean (0.05 -> 0.2) but far below 3x the start (2.0); 25x a small median but
    # below the first steps' 12.0: a hard batch late in a run, not a spike
    assert kinds(late) == []
    climbing = {"grad_norm": at([0.5, 0.4, 0.9, 2.0, 4.5]), "grad_norm_max": at([0.9, 0.6, 1.4, 3.0, 6.0])}
    assert evidence(climbing, "gradient_blowup")["ratio"] == pytest.approx(11.25)  # 0.4 -> 4.5, rising throughout
    assert kinds({"grad_norm": at([0.5, 0.4, 0.9, 2.0, 3.9])}) == []  # under 10x its lowest


def test_a_healthy_curve_label_gives_way_to_an_answer_finding() -> None:
    curves = {"train_loss": at([2.0, 1.0, 0.7, 0.6, 0.58]), "eval_loss": at([2.1, 1.1, 0.8, 0.7, 0.69])}
    assert [f.kind for f in diagnose_sft.with_step_findings(diagnose_curves(curves), curves)] == ["healthy"]
    curves["eval_unfinished"] = at([1.0, 1.0, 1.0, 0.9, 0.9])
    assert [f.kind for f in diagnose_sft.with_step_findings(diagnose_curves(curves), curves)] == ["never_stops"]


def test_a_gradient_blowup_beside_underfitting_says_the_learning_rate_is_too_high() -> None:
    """Recorded: MiniLM on the shipped reviews, batch 8, learning rate 3e-2 (120 steps, every 10th)."""
    curves = {"train_loss": at([0.823, 0.717, 0.693, 0.689, 0.703, 0.682, 0.696, 0.724, 0.708, 0.701, 0.7, 0.693]),
              "eval_loss": at([0.712, 0.69, 0.688, 0.689, 0.693, 0.69, 0.693, 0.692, 0.692, 0.689, 0.69, 0.689]),
              "grad_norm": at([0.716, 0.246, 0.266, 0.282, 0.365, 0.422, 0.643, 0.58, 0.951, 0.423, 0.731, 0.588]),
              "grad_norm_max": at([3.98, 0.68, 0.41, 0.53, 0.98, 0.8, 2.8, 2.33, 11.47, 6.44, 3.34, 2.6])}
    found = diagnose_sft.with_step_findings(diagnose_curves(curves), curves)
    assert [f.kind for f in found] == ["underfitting", "gradient_blowup"]
    assert found[1].evidence["step"] == 90 and found[1].evidence["ratio"] == pytest.approx(11.47 / 0.3935, abs=1e-3)
    assert found[1].message.endswith("the learning rate is too high, not too low")


def test_the_study_advice_counts_the_trials_of_each_finding() -> None:
    import optuna
    from optuna.distributions import FloatDistribution

    from hpo.analysis.diagnose import diagnose_study

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("hpo", {"sweep": {"metric": "eval_exact_match", "direction": "maximize", "max_steps": 30}})
    never = at([1.0, 1.0, 0.9])
    spiky = {"grad_norm": at([0.5, 0.4, 0.45]), "grad_norm_max": at([2.0, 1.0, 30.0])}
    for rate, curves in ((3e-2, {"eval_unfinished": never, **spiky}), (1e-3, {"eval_unfinished": never}),
                         (3e-4, {"eval_unfinished": at([0.3, 0.1, 0.0])})):
        study.add_trial(optuna.trial.create_trial(
            params={"learning_rate": rate}, distributions={"learning_rate": FloatDistribution(1e-4, 1e-1, log=True)},
            value=0.1, user_attrs={"curves": curves}))
    diagnosis = diagnose_study(study)
    assert [t.kinds for t in diagnosis.trials] == [["never_stops", "gradient_blowup"], ["never_stops"], []]
    assert diagnosis.advice[:2] == [
        "2 of 3 trials had answers that ran to max_new_tokens without ending (never_stops): train longer, and check "
        "that the chat template ends the assistant turn with the tokenizer's eos token",
        "1 of 3 trials had steps whose gradient norm blew up (gradient_blowup): a lower learning rate "
        "(learning_rate 3e-02)"]


def test_answer_format_and_retain_data_are_checked() -> None:
    with pytest.raises(HpoError, match=r"answer_format='\[0-9' is not a valid regular expression \(unterminated "
                                       r"character set.*--set answer_format="):
        Sweep(task="sft", answer_format="[0-9")
    with pytest.raises(HpoError, match="retain_data='r.jsonl' applies to task=sft only"):
        Sweep(retain_data="r.jsonl")
    with pytest.raises(HpoError, match="answer_format='x' needs generated answers"):
        Sweep(task="sft", answer_format="x", generation_examples=0)
    sweep = Sweep(task="sft", answer_format=r"\d+", retain_data="r.jsonl")
    job = TrainJob.from_sweep(sweep, {})
    assert (job.sweep.answer_format, job.sweep.retain_data) == (r"\d+", "r.jsonl")


def test_an_answer_format_the_datas_own_answers_break_is_refused(tiny_llama: Path) -> None:
    tokenizer = worker_cache.load_tokenizer(str(tiny_llama))
    sweep = Sweep(model=str(tiny_llama), task="sft", train_data=str(DATES / "train.jsonl"),
                  eval_data=str(DATES / "eval.jsonl"), answer_format=r"\d{4}-\d{2}-\d{2}",
                  retain_data=str(SEARCH_SPACES / "data" / "general" / "retain.jsonl"))
    sft.check(sweep, tokenizer)  # the dates keep it; the general retain answers need not
    slashes = dataclasses.replace(sweep, answer_format=r"\d{4}/\d{2}/\d{2}")
    with pytest.raises(HpoError, match=r"train.jsonl: 400 of 400 reference answers do not match answer_format "
                                       r"'\\d\{4\}/\\d\{2\}/\\d\{2\}' in full \(row 1: '2004-07-20'\); fix the regular"):
        sft.check(slashes, tokenizer)


# --- planted in real runs of the recipe on tiny models -------------------------------------

def sft_job(model: Path, learning_rate: float, **fields) -> TrainJob:
    fields = {"eval_data": str(DATES / "eval.jsonl"), "max_steps": 4, "eval_every": 2, **fields}
    sweep = Sweep(model=str(model), task="sft", train_data=str(DATES / "train.jsonl"), max_length=96,
                  generation_examples=8, max_new_tokens=12, eval_batch_size=16, **fields)
    return TrainJob.from_sweep(sweep, {"learning_rate": learning_rate, "batch_size": 4})


def recorded(job: TrainJob) -> dict[str, list[list[float]]]:
    """The curves of one run, as the sweep records them (every reported metric by step)."""
    curves: dict[str, list[list[float]]] = {}
    training.fine_tune(job, lambda step, metrics: [curves.setdefault(k, []).append([step, v])
                                                   for k, v in metrics.items()])
    return curves


@pytest.fixture(scope="module")
def talkative_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama with untied output embeddings: greedy decoding then says random words (the
    tied one repeats the prompt's last token, a newline), and never the end token."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    path = tmp_path_factory.mktemp("talkative-llama")
    config = AutoConfig.from_pretrained(tiny_llama)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


def test_forgetting_planted_on_a_retain_set_of_the_base_models_own_answers(talkative_llama: Path,
                                                                           tmp_path: Path) -> None:
    """The retain set's references are what the base model answers, so it scores 1.0 before
    training; a high learning rate changes the answers (forgetting), a tiny one does not."""
    from transformers import AutoModelForCausalLM

    tokenizer = worker_cache.load_tokenizer(str(talkative_llama))
    base = AutoModelForCausalLM.from_pretrained(talkative_llama).eval()
    conversations = sft.read(str(DATES / "eval.jsonl"))[:8]
    prompts = sft.eval_set(sft_job(talkative_llama, 1e-6), tokenizer, conversations).prompts
    said = [a.text for a in sft.generate(base, tokenizer, prompts, 12, 8, tokenizer.pad_token_id)]
    assert all(answers.normalise(text) for text in said)
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": c[0]["content"], "completion": text}) + "\n"
                              for c, text in zip(conversations, said, strict=True)))

    small = {"retain_data": str(retain), "eval_data": str(retain), "max_steps": 2, "eval_every": 2}  # quick
    kept = recorded(sft_job(talkative_llama, 1e-6, **small))
    assert kept["retain_score_before"] == [[2, 1.0]] == kept["retain_score"]
    assert "forgetting" not in kinds(kept)

    forgot = recorded(sft_job(talkative_llama, 5e-2, **small))
    assert forgot["retain_score_before"] == kept["retain_score_before"]  # the base's, measured once per worker
    found = evidence(forgot, "forgetting")
    assert found["retain_score_before"] == 1.0 and found["retain_score"] == forgot["retain_score"][-1][1] <= 0.5
    assert found["score_drop"] >= 0.5 and found["step"] == 2
    assert found["retain_loss"] > found["retain_loss_before"]


def test_an_injected_loss_spike_shows_in_the_loss_and_the_gradient_norm(tiny_bert: Path, monkeypatch) -> None:
    """A step whose loss is 100x (its gradients too) between evaluations: the interval's mean
    hides it, its largest step loss and gradient norm do not. The same run without it: nothing."""
    sweep = Sweep(model=str(tiny_bert), train_data=str(REVIEWS / "train.tsv"), eval_data=str(REVIEWS / "eval.tsv"),
                  max_steps=12, eval_every=4, max_length=32, seed=3)
    job = TrainJob.from_sweep(sweep, {"learning_rate": 3e-3, "batch_size": 8})
    clean = recorded(job)
    assert kinds(clean) == []
    assert all(0 < norm <= peak for (_, norm), (_, peak) in zip(clean["grad_norm"], clean["grad_norm_max"], strict=True))

    calls = []
    real_forward = training._forward

    def forward_with_a_spike(model, batch):
        out = real_forward(model, batch)
        calls.append(1)
        if len(calls) == 10:  # step 10, between the evaluations at steps 8 and 12
            out.loss = out.loss * 100
        return out

    monkeypatch.setattr(training, "_forward", forward_with_a_spike)
    spiked = recorded(job)
    assert kinds(spiked) == ["loss_spikes", "gradient_blowup"]
    spike, blowup = evidence(spiked, "loss_spikes"), evidence(spiked, "gradient_blowup")
    assert (spike["after_step"], spike["step"], spike["spike_steps"]) == (8, 12, [12]) and spike["ratio"] > 50
    assert blowup["step"] == 12 and blowup["ratio"] > diagnose_sft.GRAD_SPIKE
    assert spiked["train_loss"][:2] == clean["train_loss"][:2]  # the same run until the spike


def test_the_gradient_norm_is_taken_before_clipping() -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    assert training._grad_norm([weight], 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(weight.grad, torch.tensor([0.6, 0.8]))  # clipped to norm 1
    weight.grad = torch.tensor([3.0, 4.0])
    assert training._grad_norm([weight], 0.0).item() == pytest.approx(5.0)  # no clipping: measured all the same
    torch.testing.assert_close(weight.grad, torch.tensor([3.0, 4.0]))
    norms = [torch.tensor(v) for v in (1.0, math.inf, 3.0, 2.0)]
    assert training._step_stats([0.5, 0.7, 0.3, 0.5], norms, 1) == {
        "train_loss": pytest.approx(0.5), "train_loss_max": 0.7, "grad_norm": 2.0, "grad_norm_max": 3.0}
