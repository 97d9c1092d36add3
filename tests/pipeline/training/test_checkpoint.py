import math

import pytest
import torch
from torch import nn

from pipeline.training.checkpoint import (
    Checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.training.state import LoopState

# The keys of last.pt as every run so far wrote them (reference_mean since min_delta; a checkpoint
# without it still resumes): a checkpoint of an older run still resumes.
FILE_KEYS = {
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "config",
    "plan",
    "split",
    "epoch",
    "best_mean",
    "best_epoch",
    "best_metrics",
    "stale",
    "reference_mean",
    "history",
    "stopped_reason",
}

MID_RUN = LoopState(
    epoch=3,
    best_mean=0.75,
    best_epoch=2,
    best_metrics={"val_dice_mean": 0.75, "val_dice/organ": 0.75, "val_hd95/organ": math.inf},
    stale=1,
    reference_mean=0.745,
    history=[{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(4)],
    stopped_reason="early_stopping",
)


@pytest.mark.parametrize("state", [LoopState(), MID_RUN], ids=["fresh", "mid-run"])
def test_loop_state_round_trips_through_last_pt(tmp_path, state):
    net = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    written = Checkpoint(
        model=net.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        rng=rng_state(),
        config={"train": {"epochs": 4}},
        plan={"slice_axis": 2},
        split={"train": ["a", "b"], "val": ["c"]},
        loop=state.to_checkpoint(),
    )
    path = tmp_path / "last.pt"
    save_checkpoint(path, written)

    assert set(torch.load(path, weights_only=True)) == FILE_KEYS
    read = load_checkpoint(path)
    assert LoopState.from_checkpoint(read.loop) == state
    assert read.epoch == state.epoch
    assert (read.config, read.plan, read.split) == (written.config, written.plan, written.split)
    assert torch.equal(read.model["weight"], net.state_dict()["weight"])
    assert read.optimizer["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert read.scheduler == scheduler.state_dict()


def test_a_loop_state_from_before_min_delta_resumes_with_its_best_as_reference():
    entries = MID_RUN.to_checkpoint()
    del entries["reference_mean"]
    assert LoopState.from_checkpoint(entries).reference_mean == MID_RUN.best_mean


def test_a_file_without_the_checkpoint_keys_is_refused_by_name(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, **MID_RUN.to_checkpoint()}, path)
    with pytest.raises(ValueError, match=r"lacks optimizer, scheduler, rng, config, plan, split\. Delete it"):
        load_checkpoint(path)


def test_restored_generators_draw_the_same_numbers():
    state = rng_state()
    first = torch.rand(4)
    set_rng_state(state)
    assert torch.equal(torch.rand(4), first)


def test_the_weights_average_round_trips_and_older_checkpoints_have_none(tmp_path):
    net = nn.Linear(3, 2)
    average = {"model": {k: v * 0.5 for k, v in net.state_dict().items()}, "updates": 7}
    fields = dict(
        model=net.state_dict(),
        optimizer={},
        scheduler={},
        rng=rng_state(),
        config={},
        plan={},
        split={"train": [], "val": []},
        loop=MID_RUN.to_checkpoint(),
    )
    with_average, without = tmp_path / "with.pt", tmp_path / "without.pt"
    save_checkpoint(with_average, Checkpoint(**fields, average=average))
    save_checkpoint(without, Checkpoint(**fields))

    assert set(torch.load(with_average, weights_only=True)) == FILE_KEYS | {"average"}
    read = load_checkpoint(with_average)
    assert read.average["updates"] == 7
    assert torch.equal(read.average["model"]["weight"], average["model"]["weight"])
    assert LoopState.from_checkpoint(read.loop) == MID_RUN  # the average is not taken for loop state
    assert load_checkpoint(without).average is None
