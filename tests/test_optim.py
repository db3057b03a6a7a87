"""Optimizer groups, LR scaling and schedule, step plan and DeepSpeed config, from the run config."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.engine.optim import (
    create_optimizer,
    create_schedule,
    deepspeed_config,
    plan_steps,
    resolve_precision,
    scaled_lr,
)
from pipeline.model import create_model


def cfg_with(*overrides):
    return load_config(None, list(overrides))


def test_no_weight_decay_on_norms_biases_and_bias_tables():
    model = create_model("swin_nano", 64, 4, num_classes=10)
    opt = create_optimizer(model, cfg_with("optim.weight_decay=0.05"))
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert all(n.endswith(".weight") and "norm" not in n for n in decay)
    assert {n for n in no_decay if "relative_position_bias_table" in n}
    assert all(n.endswith(".bias") or "norm" in n or "relative_position_bias_table" in n for n in no_decay)


def test_lr_scales_with_the_global_batch_like_the_official_recipe():
    cfg = cfg_with("train.global_batch=4096", "optim.base_lr=1.25e-4", "optim.lr_batch_base=512")
    assert scaled_lr(cfg, cfg.optim.base_lr) == pytest.approx(1e-3)  # the paper's 1e-3 at 4096


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_per_step_warmup_then_decay(decay):
    cfg = cfg_with(
        "train.global_batch=512",
        "train.micro_batch=64",
        "optim.base_lr=1e-3",
        f"schedule.decay={decay}",
        "schedule.epochs=10",
        "schedule.warmup_epochs=2",
        "schedule.warmup_lr=0",
        "schedule.min_lr=0",
    )
    plan = plan_steps(cfg, world=8, micro_batches_per_epoch=100)  # accumulation 1: 100 steps per epoch
    assert (plan.grad_accum, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (1, 100, 1000, 200)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = create_schedule(opt, cfg, plan)
    lrs = []
    for step in range(plan.total_steps + 1):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0 and lrs[100] == pytest.approx(0.5e-3) and lrs[200] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:200], lrs[1:201], strict=True))  # warm-up rises every step
    after = lrs[200:]
    if decay == "constant":
        assert after == pytest.approx([1e-3] * len(after))
    else:
        assert all(a >= b for a, b in zip(after[:-1], after[1:], strict=True)) and after[-1] == pytest.approx(
            0, abs=1e-9
        )
        mid = after[len(after) // 2]
        assert mid == pytest.approx(0.5e-3, rel=0.02)  # cosine and linear both halve at mid-decay


def test_step_plan_accumulates_and_refuses_what_does_not_divide():
    cfg = cfg_with("train.global_batch=4096", "train.micro_batch=64")
    assert plan_steps(cfg, world=16, micro_batches_per_epoch=400).grad_accum == 4
    with pytest.raises(ValueError, match="not a multiple"):
        plan_steps(cfg, world=24, micro_batches_per_epoch=400)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        plan_steps(cfg, world=16, micro_batches_per_epoch=3)


def test_deepspeed_config_follows_the_run_config():
    cfg = cfg_with("train.global_batch=256", "train.micro_batch=32", "train.zero_stage=3", "optim.grad_clip=5")
    plan = plan_steps(cfg, world=4, micro_batches_per_epoch=100)
    ds = deepspeed_config(cfg, plan, 4, "bf16")
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 5
    fp16 = deepspeed_config(cfg, plan, 4, "fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic loss scaling
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(cfg_with("train.zero_stage=4"), plan, 4, "fp32")


def test_precision_follows_the_machine():
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "fp32"
        with pytest.raises(ValueError, match="fp16 needs a GPU"):
            resolve_precision("fp16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")
