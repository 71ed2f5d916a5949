"""LoRA fine-tuning of a causal language model on plain text; objective: eval_loss.

    hpo search search_spaces/causal_lm_lora.py
    hpo search search_spaces/causal_lm_lora.py --set model=gpt2 --set train_data=my_corpus.txt
    hpo search search_spaces/causal_lm_lora.py --set max_length=256 --set max_steps=500

The default model, ``hpo/tiny-gpt2``, is a 2-layer GPT-2 built from a config (random
weights, seed 0; no download), so this runs offline in seconds per trial; give any
Hugging Face causal LM id or local folder with ``--set model=...`` for real runs. The
default text was written for this project; the last 10% of it is held out for
validation (``eval_fraction``) unless ``eval_data`` is given. Perplexity is logged too.
See search_spaces/lora.py for the module contract, and for why the ranges are what they are:
the best LoRA learning rate is about 10x full fine-tuning's and nearly rank-independent with
lora_alpha fixed (Schulman and Thinking Machines Lab, "LoRA Without Regret", 2025; Hu et
al., "LoRA", 2021), so lora_alpha stays at the recipe's 16 and is not sampled, and the
learning rate spans 1e-4..1e-2 (was 1e-4..3e-2; the top is kept high because the default
model starts from random weights); lora_dropout 0..0.1 (was 0..0.2).
"""

import hpo

sweep = hpo.Sweep(
    model="hpo/tiny-gpt2",
    task="causal_lm",
    train_data="data/text/corpus.txt",
    eval_data=None,
    metric="eval_loss",
    direction="minimize",
    trials=8,
    max_steps=60,
    eval_every=20,
    max_length=128,
    pruner="asha",
    seed=0,
)


def space(trial):
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [4, 8, 16]),
        "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
        "lora_r": trial.suggest_categorical("lora_r", [4, 8, 16]),
        "lora_dropout": trial.suggest_float("lora_dropout", 0.0, 0.1),
    }
