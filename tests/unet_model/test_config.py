import pytest

from unet_model import UNetConfig


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 1}, "num_classes"),
        ({"base_channels": -8}, "base_channels"),
        ({"depth": 0}, "depth"),
        ({"depth": 2.5}, "depth"),
        ({"norm": "group"}, "norm"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_values_name_argument_and_value(kwargs, name):
    with pytest.raises(ValueError) as err:
        UNetConfig(**kwargs)
    message = str(err.value)
    assert f"UNetConfig.{name}" in message
    assert repr(next(iter(kwargs.values()))) in message


def test_norm_error_lists_options():
    with pytest.raises(ValueError, match="batch, instance, none"):
        UNetConfig(norm="layer")


def test_frozen():
    with pytest.raises(AttributeError):
        UNetConfig().depth = 5  # type: ignore[misc]


def test_round_trip_and_unknown_keys():
    config = UNetConfig(base_channels=16, dropout=0.2)
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown UNetConfig key.*widht.*valid keys"):
        UNetConfig.from_dict({"widht": 3})
