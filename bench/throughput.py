"""Training throughput of hpo's recipe against ``transformers.Trainer``, side by side.

    python bench/throughput.py                                   # SmolLM2-135M-Instruct, 10 steps
    python bench/throughput.py --model /path/to/tiny-llama --steps 30 --batch-size 8
    python bench/throughput.py --device cuda --precision bf16 --steps 50 --max-length 512   # on a GPU

Same process, same device and precision (``--device``, ``--precision``: on a GPU the Trainer
gets ``bf16``/``fp16`` as the recipe autocasts), same base model (LoRA r=8 on q_proj,v_proj),
same optimizer (AdamW; ``--fused`` gives both the fused kernel), same tokenized sft data
(search_spaces/data/dates, the chat template applied, answer-only labels), same batch size,
sequence length, learning rate and number of optimizer steps. Each side first runs 2 warm-up
steps (model load, tokenization, first allocations are not timed); then the timed run.
Tokens are the non-padding tokens of the batches each side actually trained on (both use
:func:`hpo.train.sft.collate`, counted by wrapping it). Timers stop after
``torch.cuda.synchronize()`` on a GPU (CUDA runs asynchronously). The Trainer runs without
logging, saving or evaluation, with no data-loader workers; pinned memory on a GPU.

Prints one JSON line: tokens/s of each, their ratio (recipe / Trainer), the recipe's own
``tokens_per_second`` and (on a GPU in :data:`hpo.train.cost.PEAK_TFLOPS`) ``mfu``, and the settings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATES = REPO / "search_spaces" / "data" / "dates"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hpo/smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--fused", action="store_true", help="fused AdamW on both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hpo import Sweep
    from hpo.train import accelerator, sft, training, worker_cache
    from hpo.train.recipe import TrainJob, TrainParams

    device = torch.device(args.device)
    precision = accelerator.resolve_precision(args.precision, device)

    counted = {"tokens": 0}
    collate = sft.collate

    def counting(dataset, indices):
        batch = collate(dataset, indices)
        mask = batch.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch

    sft.collate = counting  # both sides build their batches through it
    eval_file = Path("/tmp") / "hpo-bench-eval.jsonl"
    eval_file.write_text((DATES / "eval.jsonl").read_text().splitlines()[0] + "\n")
    params = TrainParams(learning_rate=1e-3, batch_size=args.batch_size, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                         target_modules=("q_proj", "v_proj"))

    def job(steps: int) -> TrainJob:
        sweep = Sweep(model=args.model, task="sft", train_data=str(DATES / "train.jsonl"), eval_data=str(eval_file),
                      max_length=args.max_length, max_steps=steps, eval_every=steps, eval_batch_size=1, seed=0,
                      generation_examples=0, device=args.device, gpus_per_trial=1 if args.device == "cuda" else 0,
                      precision=precision, fused_optimizer=args.fused)
        return TrainJob(sweep=sweep, model=args.model, seed=0, params=params)

    def synchronised() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    reported: dict = {}

    def recipe(steps: int) -> tuple[int, float]:
        counted["tokens"] = 0
        started = synchronised()
        training.fine_tune(job(steps), lambda step, metrics: reported.update(metrics))
        return counted["tokens"], synchronised() - started

    def trainer(steps: int) -> tuple[int, float]:
        from peft import get_peft_model
        from transformers import PrinterCallback, Trainer, TrainingArguments

        train_set = worker_cache.datasets(job(steps), worker_cache.load_tokenizer(args.model))[0]
        base = worker_cache.base_model(job(steps), 0, worker_cache.load_tokenizer(args.model), device, precision)
        base.config.use_cache = False
        torch.manual_seed(0)
        model = get_peft_model(base, worker_cache.lora_config(job(steps), base.config.model_type))
        scratch = tempfile.TemporaryDirectory(prefix="hpo-bench-trainer-")  # Trainer wants a folder; it saves nothing
        settings = TrainingArguments(
            output_dir=scratch.name, max_steps=steps, per_device_train_batch_size=args.batch_size,
            learning_rate=params.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch_fused" if args.fused else "adamw_torch", logging_strategy="no",
            save_strategy="no", eval_strategy="no", report_to=[], use_cpu=device.type == "cpu",
            bf16=precision == "bf16", fp16=precision == "fp16", dataloader_num_workers=0,
            dataloader_pin_memory=device.type == "cuda", disable_tqdm=True, seed=0, remove_unused_columns=False,
        )
        rows = [{"index": i} for i in range(len(train_set))]
        run = Trainer(model=model, args=settings, train_dataset=rows,
                      data_collator=lambda features: sft.collate(train_set, [f["index"] for f in features]))
        run.remove_callback(PrinterCallback)  # it prints the final metrics: one JSON line is ours
        counted["tokens"] = 0
        started = synchronised()
        try:
            run.train()
            ended = synchronised()
        finally:
            model.unload()
            scratch.cleanup()
        return counted["tokens"], ended - started

    recipe(2), trainer(2)  # warm-up: loading and tokenizing are not timed
    ours_tokens, ours_seconds = recipe(args.steps)
    their_tokens, their_seconds = trainer(args.steps)
    ours, theirs = ours_tokens / ours_seconds, their_tokens / their_seconds
    print(json.dumps({
        "model": args.model, "device": accelerator.describe(device).get("device_name") or args.device,
        "precision": precision, "fused": args.fused, "steps": args.steps, "batch_size": args.batch_size,
        "max_length": args.max_length, "threads": args.threads,
        "recipe_tokens_per_s": round(ours, 1), "trainer_tokens_per_s": round(theirs, 1),
        "recipe_reported_tokens_per_s": round(reported.get("tokens_per_second", 0.0), 1),
        "recipe_mfu": round(reported["mfu"], 4) if "mfu" in reported else None,
        "ratio": round(ours / theirs, 3), "recipe_tokens": ours_tokens, "trainer_tokens": their_tokens,
        "recipe_seconds": round(ours_seconds, 2), "trainer_seconds": round(their_seconds, 2),
    }))


if __name__ == "__main__":
    main()
