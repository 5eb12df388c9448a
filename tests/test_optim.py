"""Optimizers (separate groups, Prodigy settings, 8-bit refusal), schedules with warmup, pickle-free state."""

import pytest
import torch

from pti.training.optim import (
    SCHEDULERS,
    OptimizerError,
    ParamGroup,
    build_optimizer,
    build_scheduler,
    join_optimizer_state,
    split_optimizer_state,
)

CPU = torch.device("cpu")


def _groups():
    torch.manual_seed(0)
    return [ParamGroup("embeddings", [torch.nn.Parameter(torch.randn(5, 3))], lr=3e-4, weight_decay=0.0),
            ParamGroup("lora", [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))],
                       lr=1e-4, weight_decay=1e-4)]


def _train(optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = sum((p**2).sum() for g in optimizer.param_groups for p in g["params"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_adamw_keeps_separate_learning_rates_and_weight_decay():
    optimizer = build_optimizer(_groups(), "adamw", CPU)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("embeddings", 3e-4, 0.0), ("lora", 1e-4, 1e-4)]


def test_prodigy_uses_the_community_settings():
    optimizer = build_optimizer(_groups(), "prodigy", CPU)
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == "Prodigy"
    assert all(g["lr"] == 1.0 for g in optimizer.param_groups)
    assert group["safeguard_warmup"] and group["use_bias_correction"] and group["decouple"]
    assert tuple(group["betas"]) == (0.9, 0.99)
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    _train(optimizer, 3)
    after = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("kind, message", [("adamw8bit", "needs a CUDA GPU"), ("sgd", "must be one of")])
def test_unusable_optimizer_is_refused_in_one_line(kind, message):
    with pytest.raises(OptimizerError, match=message) as info:
        build_optimizer(_groups(), kind, CPU)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_warms_up_linearly(name):
    optimizer = build_optimizer(_groups(), "adamw", CPU)
    scheduler = build_scheduler(name, optimizer, warmup_steps=10, total_steps=100)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    if name == "constant":  # the one schedule without warmup, as in diffusers
        assert lrs == [3e-4] * 10
    else:
        assert lrs[0] == 0.0
        assert lrs[5] == pytest.approx(3e-4 * 0.5)
        assert scheduler.get_last_lr()[0] == pytest.approx(3e-4)


def test_unknown_scheduler_is_refused():
    optimizer = build_optimizer(_groups(), "adamw", CPU)
    with pytest.raises(OptimizerError, match="lr_scheduler must be one of"):
        build_scheduler("warp", optimizer, warmup_steps=0, total_steps=10)


@pytest.mark.parametrize("kind", ["adamw", "prodigy"])
def test_state_round_trip_without_pickle_continues_identically(kind):
    reference = build_optimizer(_groups(), kind, CPU)
    _train(reference, 3)
    tensors, rest = split_optimizer_state(reference.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    import json

    rest = json.loads(json.dumps(rest))  # what a checkpoint stores
    resumed = build_optimizer(_groups(), kind, CPU)
    with torch.no_grad():
        for p_resumed, p_reference in zip(_params(resumed), _params(reference)):
            p_resumed.copy_(p_reference)
    resumed.load_state_dict(join_optimizer_state(tensors, rest))
    _train(reference, 2)
    _train(resumed, 2)
    for a, b in zip(_params(resumed), _params(reference)):
        assert torch.equal(a, b)


def _params(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]
