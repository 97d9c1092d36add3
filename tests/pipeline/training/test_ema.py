import itertools

import pytest
import torch
from torch import nn

from pipeline.training.ema import WeightAverage


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_the_decay_follows_the_weights_early_and_reaches_its_cap_late():
    average = WeightAverage(_net(), 0.999)
    decays = []
    for _ in range(10000):
        decays.append(average.current_decay())
        average.updates += 1
    assert decays[0] == pytest.approx(2 / 11)
    assert decays[99] == pytest.approx(101 / 110)
    assert all(a <= b for a, b in itertools.pairwise(decays))
    assert decays[-1] == 0.999


def test_an_update_moves_the_average_by_one_minus_decay_and_leaves_the_model_alone():
    net = _net()
    average = WeightAverage(net, 0.5)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].running_mean.fill_(2.0)
    net[1].num_batches_tracked.fill_(5)
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    weight = 1.0 - average.current_decay()

    average.update(net)

    got = average.model.state_dict()
    for name, value in net.state_dict().items():
        assert torch.equal(value, model_state[name])  # the trained model is only read
        if value.is_floating_point():
            assert torch.allclose(got[name], start[name] + weight * (value - start[name]), atol=1e-6), name
    assert got["1.num_batches_tracked"].item() == 5  # an integer buffer is copied, not averaged
    assert average.updates == 1


def test_the_average_of_a_still_model_is_that_model_and_needs_no_gradients():
    net = _net()
    average = WeightAverage(net, 0.99)
    for _ in range(50):
        average.update(net)
    for name, value in net.state_dict().items():
        assert torch.allclose(average.model.state_dict()[name].float(), value.float()), name
    assert not any(p.requires_grad for p in average.model.parameters())
    assert not average.model.training


def test_the_average_smooths_weights_that_jitter_around_a_value():
    net = _net()
    target = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    average = WeightAverage(net, 0.99)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2000):
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(target[name] + 0.1 * torch.randn(p.shape, generator=generator))
        average.update(net)
    for name, p in net.named_parameters():
        step_error = (p - target[name]).abs().mean()
        average_error = (average.model.state_dict()[name] - target[name]).abs().mean()
        assert average_error < step_error / 4, name


def test_state_round_trips_and_a_wrong_architecture_is_refused():
    net = _net()
    average = WeightAverage(net, 0.9)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    average.update(net)
    restored = WeightAverage(_net(), 0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 1
    assert torch.equal(restored.model[0].weight, average.model[0].weight)

    other = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.raises(ValueError, match=r"0\.weight"):
        average.update(other)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, 1.0)


def test_entries_are_matched_by_name_not_only_by_shape():
    from collections import OrderedDict

    first = nn.Sequential(OrderedDict(a=nn.Linear(3, 3), b=nn.Linear(3, 3)))
    swapped = nn.Sequential(OrderedDict(b=nn.Linear(3, 3), a=nn.Linear(3, 3)))
    with pytest.raises(ValueError, match=r"a\.weight .* b\.weight"):
        WeightAverage(first, 0.9).update(swapped)
