import numpy as np
import pytest
from scipy import ndimage

from pipeline.synthetic.dataset import _orientation, _origin, _slab, dicom_affine
from pipeline.synthetic.dicom import SeriesSpec, slice_positions
from pipeline.synthetic.phantom import (
    REACHES_OUT,
    Ellipsoid,
    make_anatomy,
    make_phantom,
    sample,
    surface_share_outside,
)


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


# One anatomy seen through the series geometry the demo writes (the affine its headers carry).
ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique", "feet_first")


def _acquire(anatomy, orientation, shape, spacing, center, seed=0):
    """(image, label, affine) of `anatomy` scanned as a DICOM series in `orientation` centred at `center`."""
    iop = _orientation(orientation)
    ss, ps = spacing
    spec = SeriesSpec(
        orientation=iop,
        origin=_origin(iop, shape, (ps, ps), ss, center),
        pixel_spacing=(ps, ps),
        slice_spacing=ss,
    )
    affine = dicom_affine(spec, slice_positions(spec, shape[0]))
    image, label = sample(anatomy, shape, affine, seed=seed)
    return image, label, affine


def _world_centroid(mask, affine):
    """Centroid of `mask` (slices, rows, columns) in RAS mm."""
    ijk = np.argwhere(mask)[:, ::-1].mean(axis=0)  # (column, row, slice)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("seed", [0, 5, 11])
def test_one_anatomy_has_one_volume_and_place_in_every_orientation(seed, modality):
    center = (12.0, -8.0, 30.0)
    anatomy = make_anatomy(seed, modality, fov=120.0, center=center)
    # Every grid covers the same 150 mm box around the body, at different voxel sizes.
    grids = {
        "axial": ((50, 120, 120), (3.0, 1.25)),
        "sagittal": ((60, 100, 100), (2.5, 1.5)),
        "coronal": ((38, 150, 150), (4.0, 1.0)),
        "oblique": ((50, 120, 120), (3.0, 1.25)),
        "feet_first": ((43, 110, 110), (3.5, 1.4)),
    }
    found = {}
    for orientation, (shape, spacing) in grids.items():
        _, label, affine = _acquire(anatomy, orientation, shape, spacing, center)
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        found[orientation] = {
            "organ_ml": (label > 0).sum() * voxel_ml,
            "lesion_ml": (label == 2).sum() * voxel_ml,
            "organ_at": _world_centroid(label > 0, affine),
            "lesion_at": _world_centroid(label == 2, affine),
        }
    reference = found["axial"]
    assert reference["organ_ml"] > 50 and reference["lesion_ml"] > 3, reference
    for orientation, got in found.items():
        assert got["organ_ml"] == pytest.approx(reference["organ_ml"], rel=0.03), orientation
        assert got["lesion_ml"] == pytest.approx(reference["lesion_ml"], rel=0.06), orientation
        assert np.linalg.norm(got["organ_at"] - reference["organ_at"]) < 1.0, orientation
        assert np.linalg.norm(got["lesion_at"] - reference["lesion_at"]) < 1.5, orientation
    # ... and that place is the anatomy's organ, in RAS (the spine and the skin trim it a little).
    organ_ras = np.diag([-1.0, -1.0, 1.0]) @ anatomy.organ.center
    assert np.linalg.norm(reference["organ_at"] - organ_ras) < 8.0


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_masks_overlay_the_image_and_lesions_keep_their_contrast(orientation, modality):
    anatomy = make_anatomy(3, modality, fov=140.0, center=(-5.0, 10.0, 0.0))
    contrast = anatomy.values["lesion"] - anatomy.values["organ"]
    for shape, spacing in [((40, 112, 112), (2.5, 1.25)), ((24, 96, 96), (4.0, 1.5))]:
        n, ss, center = _slab(anatomy, _orientation(orientation), spacing[0], coverage=0.9, max_slices=60)
        image, label, _ = _acquire(anatomy, orientation, (n, *shape[1:]), (ss, spacing[1]), center, seed=1)
        organ_slices = (label > 0).any(axis=(1, 2)).mean()
        lesion_slices = (label == 2).any(axis=(1, 2)).mean()
        assert organ_slices >= 0.9 and lesion_slices >= 0.3, (organ_slices, lesion_slices)
        organ, lesion = np.median(image[label == 1]), np.median(image[label == 2])
        assert (lesion - organ) / contrast > 0.75, (orientation, spacing, organ, lesion)
        # The mask's edge is the image's edge: just outside the organ the image is not organ-like.
        outside = ndimage.binary_dilation(label > 0, iterations=2) & (label == 0)
        step = abs(anatomy.values["organ"] - anatomy.values["body"])
        assert abs(np.median(image[outside]) - organ) > 0.5 * step, (orientation, spacing)


def test_surface_share_outside_measures_how_much_of_a_shape_pokes_out():
    outer = Ellipsoid(np.zeros(3), np.array([10.0, 8.0, 20.0]))
    inside = Ellipsoid(np.array([1.0, 0.0, 2.0]), np.array([3.0, 3.0, 5.0]))
    assert surface_share_outside(inside, outer) == 0.0
    # A sphere centred on the outer one's surface: about half of it is outside.
    on_edge = Ellipsoid(np.array([10.0, 0.0, 0.0]), np.array([2.0, 2.0, 2.0]))
    assert 0.4 < surface_share_outside(on_edge, outer) < 0.6
    beyond = Ellipsoid(np.array([30.0, 0.0, 0.0]), np.array([2.0, 2.0, 2.0]))
    assert surface_share_outside(beyond, outer) == 1.0


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_lesion_reaching_past_its_organ_shows_against_the_tissue_round_it_too(modality):
    dark_inside = bright_inside = reaching = 0
    for seed in range(120):
        a = make_anatomy(seed, modality)
        organ, lesion, body = a.values["organ"], a.values["lesion"], a.values["body"]
        if surface_share_outside(a.lesion, a.organ) >= REACHES_OUT:
            reaching += 1
            # as far from the soft tissue round the organ as the least contrast it has with the organ
            if modality == "CT":
                assert lesion - body >= 40, (seed, lesion, body)
            else:
                assert lesion / body >= 1.5, (seed, lesion, body)
        elif lesion < organ:
            dark_inside += 1
        else:
            bright_inside += 1
    # Lesions inside the organ stay of both kinds; some of every kind are drawn.
    assert min(dark_inside, bright_inside, reaching) >= 15, (dark_inside, bright_inside, reaching)
