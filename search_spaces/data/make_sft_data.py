"""Write the instruction data of ``search_spaces/sft_lora.py``: dates to ISO 8601.

    python search_spaces/data/make_sft_data.py     # rewrites data/dates/{train,eval}.jsonl

Each example asks for one date, written in one of a dozen everyday styles ("March 5, 2021",
"the 5th of March 2021", "Fri 05 Mar 2021", "2021 March 5", ...), to be rewritten as
``YYYY-MM-DD``. The answer is checkable by exact match, a 135M chat model gets it wrong
zero-shot most of the time (it adds words, keeps the input's format, swaps day and month),
and a LoRA adapter learns it in about a hundred steps. Seeded: the files are reproducible.
train.jsonl holds ``prompt``/``completion`` rows; eval.jsonl holds the same task as
``messages`` rows (chat format), so both formats the recipe reads are exercised.
"""

from __future__ import annotations

import calendar
import datetime
import json
import random
from pathlib import Path

SEED = 20241125
TRAIN, EVAL = 400, 60
MONTHS = list(calendar.month_name)[1:]
SHORT = list(calendar.month_abbr)[1:]
DAYS = list(calendar.day_abbr)


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{SHORT[d.month - 1]} {d.day} {d.year}",
    lambda d: f"{DAYS[d.weekday()]} {d.day:02d} {SHORT[d.month - 1]} {d.year}",
    lambda d: f"{d.year} {MONTHS[d.month - 1]} {d.day}",
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",
    lambda d: f"{d.day}.{d.month}.{d.year} (day.month.year)",
    lambda d: f"{d.month}/{d.day}/{d.year} (US style)",
    lambda d: f"{SHORT[d.month - 1].upper()} {d.day}, {d.year}",
    lambda d: f"{ordinal(d.day)} {SHORT[d.month - 1]}. {d.year}",
    lambda d: f"{MONTHS[d.month - 1].lower()} {d.day} {d.year}",
]
ASKS = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD): {date}",
    "Write the date {date} as YYYY-MM-DD.",
    "What is {date} in ISO format? Answer with the date only.",
    "Rewrite as an ISO 8601 date: {date}",
]


def examples(rng: random.Random, count: int, seen: set[str]) -> list[tuple[str, str]]:
    rows = []
    start = datetime.date(1950, 1, 1).toordinal()
    end = datetime.date(2049, 12, 31).toordinal()
    while len(rows) < count:
        day = datetime.date.fromordinal(rng.randint(start, end))
        prompt = rng.choice(ASKS).format(date=rng.choice(STYLES)(day))
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append((prompt, day.isoformat()))
    return rows


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    folder = Path(__file__).resolve().parent / "dates"
    folder.mkdir(exist_ok=True)
    with (folder / "train.jsonl").open("w") as handle:
        for prompt, answer in examples(rng, TRAIN, seen):
            handle.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
    with (folder / "eval.jsonl").open("w") as handle:
        for prompt, answer in examples(rng, EVAL, seen):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main()
