"""LoRA+ in the built-in recipe: off by default (one AdamW group, as before); on, lora_B learns at ratio x lora_A's rate."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hpo import Sweep
from hpo.train.recipe import TrainJob, TrainParams, check_params
from hpo.train.training import make_optimizer


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encode(x)))


def adapted() -> tuple[torch.nn.Module, list[torch.nn.Parameter], dict[int, str]]:
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=16, target_modules=["encode"], modules_to_save=["head"]))
    trainable = [w for w in model.parameters() if w.requires_grad]
    names = {id(w): name for name, w in model.named_parameters()}
    return model, trainable, names


def test_off_by_default_is_one_adamw_group_as_before() -> None:
    model, trainable, _ = adapted()
    optimizer = make_optimizer(model, trainable, TrainParams(learning_rate=1e-3, weight_decay=0.01))
    assert TrainParams().loraplus_lr_ratio == 0.0
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.01)
    assert [id(w) for w in group["params"]] == [id(w) for w in trainable]


def test_the_b_matrices_learn_at_ratio_times_the_a_rate() -> None:
    model, trainable, names = adapted()
    optimizer = make_optimizer(model, trainable, TrainParams(learning_rate=1e-3, weight_decay=0.01, loraplus_lr_ratio=16))
    lr = {names[id(w)]: group["lr"] for group in optimizer.param_groups for w in group["params"]}
    assert set(lr) == set(names[id(w)] for w in trainable), "every trainable weight is optimized, once"
    a = [name for name in lr if "lora_A" in name]
    b = [name for name in lr if "lora_B" in name]
    assert a and b
    assert all(lr[name] == 1e-3 for name in a) and all(lr[name] == pytest.approx(16e-3) for name in b)
    decay = {names[id(w)]: group["weight_decay"] for group in optimizer.param_groups for w in group["params"]}
    assert {decay[name] for name in a + b} == {0.01}


def test_a_space_may_sample_the_ratio() -> None:
    assert check_params({"learning_rate": 5e-4, "loraplus_lr_ratio": 16.0}) is None
    assert "at least 0" in check_params({"loraplus_lr_ratio": -1.0})
    job = TrainJob.from_sweep(Sweep(), {"loraplus_lr_ratio": 8.0})
    assert job.params.loraplus_lr_ratio == 8.0 and job.describe()["loraplus_lr_ratio"] == 8.0


def test_the_recipe_trains_with_loraplus_and_reports_the_a_rate(tiny_bert) -> None:  # noqa: ANN001
    from tests.test_training import classification_job, run

    plain = run(classification_job(tiny_bert))
    plus = run(classification_job(tiny_bert, loraplus_lr_ratio=16.0))
    assert [step for step, _ in plus] == [5, 10, 12]
    assert [m["learning_rate"] for _, m in plus] == [m["learning_rate"] for _, m in plain], "learning_rate is lora_A's"
    assert plus[-1][1]["train_loss"] != plain[-1][1]["train_loss"], "the B matrices moved faster"
