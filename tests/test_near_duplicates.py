"""Near-duplicates (MinHash LSH) and paraphrase leakage (embedding + word cosine): planted
rewrites of eval rows in training are found, and ``hpo check-data --paraphrases`` shows the
pairs, writes them as CSV and says in one line that the eval score is suspect."""

from __future__ import annotations

import csv
import random
import re
import time
from pathlib import Path

from hpo.analysis.near_duplicates import find_pairs
from tests.conftest import SHARED_DATA, needs_shared_data, run_hpo

SYNONYMS = {
    "good": "fine", "movie": "film", "film": "movie", "bad": "poor", "great": "terrific", "funny": "amusing",
    "story": "tale", "best": "finest", "characters": "roles", "director": "filmmaker", "performance": "turn",
    "performances": "turns", "beautiful": "lovely", "boring": "dull", "little": "small", "big": "large",
    "makes": "renders", "very": "really", "really": "truly", "fun": "enjoyable", "interesting": "intriguing",
    "script": "screenplay", "smart": "clever", "dark": "grim", "new": "fresh", "work": "effort", "films": "movies",
    "movies": "films", "entertaining": "amusing", "worst": "poorest", "never": "not ever", "often": "frequently",
    "comedy": "farce", "audience": "viewers", "audiences": "viewers", "feel": "sense", "life": "existence",
    "love": "adore", "hard": "tough", "pretty": "fairly",
}


def rewrite(text: str, rng: random.Random) -> str:
    """A paraphrase as a careless copy makes one: punctuation dropped, synonyms swapped, the
    first third of the words moved to the end and two neighbours swapped, case and end changed."""
    words = [SYNONYMS.get(w.lower(), w) for w in text.split() if re.search(r"\w", w)]
    cut = max(1, len(words) // 3)
    words = words[cut:] + words[:cut]
    if len(words) > 2:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    out = " ".join(words)
    return (out.upper() if rng.random() < 0.3 else out.capitalize()) + rng.choice([".", "!", "...", "", " ;-)"])


@needs_shared_data
def test_planted_paraphrases_of_eval_rows_in_train_are_found() -> None:
    """10,000 SST-2 training rows with 3% of the dev rows rewritten into them: precision >= 0.9 and
    recall >= 0.8 over the leaked dev rows (measured 0.96 and 1.0 in 34 s at load 3)."""
    assert SHARED_DATA is not None
    rng = random.Random(0)
    train = rng.sample([line.rstrip("\n").split("\t")[1] for line in (SHARED_DATA / "sst2" / "train.tsv").open()][1:],
                       10_000)
    dev = [line.rstrip("\n").split("\t")[1] for line in (SHARED_DATA / "sst2" / "dev.tsv").open()][1:]
    planted = set(rng.sample(range(len(dev)), round(0.03 * len(dev))))
    for j in sorted(planted):
        train.insert(rng.randrange(len(train)), rewrite(dev[j], rng))
    started = time.perf_counter()
    found = find_pairs((list(range(1, len(train) + 1)), train), (list(range(1, len(dev) + 1)), dev), "dev.tsv",
                       model="sentence-transformers/all-MiniLM-L6-v2")
    seconds = time.perf_counter() - started
    leaked = {row - 1 for row in found.leaked}
    precision, recall = len(leaked & planted) / max(len(leaked), 1), len(leaked & planted) / len(planted)
    print(f"paraphrase leakage: {len(planted)} planted, {len(leaked)} flagged, precision {precision:.2f}, "
          f"recall {recall:.2f}, {seconds:.0f} s")
    assert precision >= 0.9 and recall >= 0.8
    assert seconds < 90  # the target is 60 s; the margin is for the other sessions on these 2 cores
    assert found.warning().startswith(f"eval score suspect: {len(leaked)} of {len(dev)} validation rows")


def test_check_data_paraphrases_pairs_csv_and_warning(tmp_path: Path) -> None:
    topics = ("the harbour", "a mountain village", "the old mill", "a night train", "the lighthouse keeper",
              "a chess club", "the flooded valley", "a travelling circus", "the border town", "an orchard")
    train = [(i % 2, f"a {('slow', 'gripping')[i % 2]} story about {topic} told over {i + 2} long winters")
             for i, topic in enumerate(topics)]
    train.append((1, "a slow story about the harbour told over 2 long winters and springs"))  # near-duplicate of row 1
    train.append((0, "A LOST DOG, TOLD OVER 60 LONG WINTERS: A SLOW TALE ABOUT IT!"))  # eval row 1, rewritten
    evaluation = [(0, "a slow story about a lost dog told over 60 long winters"),
                  (1, "an unrelated note on cooking pasta with fresh basil and garlic")]
    for name, rows in (("train.tsv", train), ("eval.tsv", evaluation)):
        (tmp_path / name).write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
    result = run_hpo(["check-data", "--set", f"train_data={tmp_path / 'train.tsv'}", "--set",
                      f"eval_data={tmp_path / 'eval.tsv'}", "--no-tokenizer", "--paraphrases"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (f"eval score suspect: 1 of 2 validation rows (50.0%) of {tmp_path / 'eval.tsv'} are near-duplicates "
            "or paraphrases of training rows") in result.stdout
    with (tmp_path / ".hpo" / "checks" / "train" / "near_duplicates.csv").open() as handle:
        pairs = list(csv.DictReader(handle))
    found = {(p["kind"], p["scope"], p["train_row"], p["other_row"]) for p in pairs}
    assert found == {("near_duplicate", "train", "1", "11"), ("paraphrase", "train-eval", "12", "1")}
    assert all(0.7 <= float(p["similarity"]) <= 1 for p in pairs)


def test_sft_prompts_and_causal_lm_paragraphs_are_paired(tmp_path: Path) -> None:
    """The same check reads sft prompts and causal-LM paragraphs (MinHash only: model=None)."""
    import json

    from hpo.analysis.near_duplicates import check_pairs

    prompts = [f"explain how the {thing} in the old {place} works step by step" for thing, place in
               zip(("pump", "clock", "loom", "press", "kiln"), ("mill", "tower", "barn", "shop", "yard"), strict=True)]
    train = [*prompts, "explain how the pump in the old mill works step by step please"]  # row 6 ~ row 1
    evaluation = ["explain how the old clock in the tower works, step by step", "what is the capital of peru"]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": p, "completion": "ok"}) + "\n" for p in rows))
    found = check_pairs(str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl"), task="sft", model=None)
    assert {(p.scope, p.first_row, p.second_row) for p in found.pairs} == {("train", 1, 6), ("train-eval", 2, 1)}
    assert found.leaked == [1] and found.warning().startswith("eval score suspect: 1 of 2 validation rows (50.0%)")

    paragraphs = ["The light keeper rose early, lit the lamp and wrote the weather in the log book.",
                  "Ships passed the point at dusk, their horns low over the grey water.",
                  "In winter the village emptied and only the baker kept his ovens warm.",
                  "A storm in March tore half the roof away; the keeper mended it alone.",
                  "The light keeper rose early, lit the lamp and wrote the weather in the big log book."]
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(paragraphs) + "\n")
    found = check_pairs(str(book), None, task="causal_lm", model=None, eval_fraction=0.2)
    assert [(p.kind, p.scope) for p in found.pairs] == [("near_duplicate", "train-eval")]
    assert found.pairs[0].first_text.startswith("The light keeper") and "big log book" in found.pairs[0].second_text
