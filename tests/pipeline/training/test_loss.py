"""The training loss: batch Dice over the slices of a step, the background left out of the Dice."""

from types import SimpleNamespace

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training.loop import training_loss

CPU = torch.device("cpu")
PLAN = SimpleNamespace(class_weights=[0.2, 1.0, 3.0])


def _confident(target: torch.Tensor, margin: float = 6.0) -> torch.Tensor:
    """Logits (N, 3, H, W) right everywhere, a softmax of ~0.005 on each wrong class."""
    return torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 3, 1, 2).float() * margin


def _two_slices() -> torch.Tensor:
    """(2, 1, 16, 16) labels: an organ on both slices, a lesion on the first only."""
    target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    target[:, :, 2:14, 2:14] = 1
    target[0, :, 5:9, 5:9] = 2
    return target


def test_batch_dice_does_not_punish_a_slice_without_the_lesion_for_tiny_probabilities():
    target = _two_slices()
    logits = _confident(target)
    loss = lambda batch_dice: training_loss(  # noqa: E731
        TrainConfig(batch_dice=batch_dice, dice_background=False), PLAN, [1.0], CPU
    )(logits, target)
    batch, per_slice = loss(True), loss(False)
    # Per slice, the lesion's Dice on the slice without it is ~0 however small its probabilities
    # (a loss of 1 for that term); over the batch it is the lesion's Dice where it is (~0.97).
    assert float(batch) < 0.1
    assert float(per_slice) > 0.2


@pytest.mark.parametrize("background", [False, True])
def test_the_dice_settings_reach_the_loss(background):
    config = TrainConfig(batch_dice=True, dice_background=background, class_weighted_ce=True)
    loss = training_loss(config, PLAN, [0.75, 0.25], CPU)
    assert loss.loss.dice.include_background is background
    assert loss.loss.dice.batch is True
    assert loss.weights == [0.75, 0.25]
    target = _two_slices()
    wrong = _confident(torch.zeros_like(target))  # background everywhere: labels missed
    assert float(loss([wrong, wrong[..., ::2, ::2]], target)) > float(
        loss([_confident(target), _confident(target)[..., ::2, ::2]], target)
    )
