"""Post-processing per label: the largest component (26-connected) and hole filling."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference.postprocess import postprocess


@pytest.mark.parametrize(("largest", "fill"), [(True, False), (False, True), (True, True)])
def test_postprocess_per_label(largest, fill):
    labels = np.zeros((12, 12, 5), np.uint8)
    labels[1:6, 1:6, 1:4] = 1
    labels[3, 3, 2] = 0  # a hole inside label 1
    labels[2, 2, 2] = 2  # a lesion inside label 1 keeps its label
    labels[9:11, 9:11, 1:3] = 1  # a smaller second component
    out = postprocess(labels, largest_component=largest, fill_holes=fill)
    assert out[2, 2, 2] == 2
    assert (out[9, 9, 1] == 0) == largest
    assert (out[3, 3, 2] == 1) == fill
    assert out.dtype == np.uint8


def test_largest_component_is_26_connected():
    """Two blocks touching only at a corner are one component (the definition predict and
    validation share), so neither is removed."""
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[2:4, 2:4, 2:4] = 1  # meets the first block at one corner voxel
    labels[5, 5, 5] = 1  # a separate single voxel
    out = postprocess(labels, largest_component=True, fill_holes=False)
    assert out[0, 0, 0] == 1 and out[3, 3, 3] == 1 and out[5, 5, 5] == 0
