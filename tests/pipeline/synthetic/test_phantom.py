import numpy as np
import pytest

from pipeline.synthetic.phantom import make_phantom


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize(
    ("shape", "spacing"), [((32, 96, 104), (3.0, 1.2, 1.2)), ((13, 33, 37), (2.5, 1.5, 1.0))]
)
@pytest.mark.parametrize("seed", [0, 7])
def test_phantom_has_both_labels_in_most_slices(modality, shape, spacing, seed):
    image, label = make_phantom(shape, spacing, seed=seed, modality=modality)
    assert image.shape == label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2}
    per_slice = [(label == k).any(axis=(1, 2)).mean() for k in (1, 2)]
    assert per_slice[0] >= 0.9, per_slice
    assert per_slice[1] >= 0.6, per_slice
    organ, lesion = (label == 1).mean(), (label == 2).mean()
    assert 0.02 < organ < 0.25, organ
    assert 0.002 < lesion < organ, (lesion, organ)


def test_ct_is_in_hounsfield_units_and_labels_have_contrast():
    image, label = make_phantom((24, 64, 64), (3.0, 1.5, 1.5), seed=3, modality="CT")
    assert np.median(image[:, 0, :]) == pytest.approx(-1000, abs=30)  # air at the image border
    organ = np.median(image[label == 1])
    assert 50 < organ < 110
    assert abs(np.median(image[label == 2]) - organ) > 30  # the lesion is visibly different


def test_mr_is_positive():
    image, label = make_phantom((24, 64, 64), (3.0, 1.5, 1.5), seed=3, modality="MR")
    assert image.min() >= 0
    assert np.median(image[label == 1]) > 3 * np.median(image[:, 0, :])


def test_same_seed_same_phantom_and_seeds_differ():
    a = make_phantom((12, 40, 40), (3.0, 1.2, 1.2), seed=1, modality="CT")
    b = make_phantom((12, 40, 40), (3.0, 1.2, 1.2), seed=1, modality="CT")
    c = make_phantom((12, 40, 40), (3.0, 1.2, 1.2), seed=2, modality="CT")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="modality must be one of CT, MR; got 'PET'"):
        make_phantom((8, 32, 32), (3.0, 1.0, 1.0), modality="PET")
