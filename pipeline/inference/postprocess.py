"""Clean-ups of a predicted label map, per label: its largest connected component, its holes filled.

Predict and validation during training both call `postprocess`, with the one definition of
"connected" (`COMPONENT_STRUCTURE`), so the champion gate scores what predict writes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# The one definition of "connected" for the largest-component clean-up, used by predict and by
# validation during training: 26-connectivity (faces, edges and corners), so a structure that
# narrows to a diagonal step on a thick-slice grid stays one component.
COMPONENT_STRUCTURE = np.ones((3, 3, 3), bool)


def postprocess(labels: np.ndarray, *, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Per label value: keep its largest connected component (COMPONENT_STRUCTURE) and/or fill
    its holes. Returns `labels` itself when neither is asked for, else a modified copy.

    Holes are filled with the label only where they are background, so a lesion inside an organ
    keeps its own label. Ties between equally large components keep the first in scan order.
    """
    if not (largest_component or fill_holes):
        return labels
    labels = labels.copy()
    for value in (int(v) for v in np.unique(labels) if v != 0):
        mask = labels == value
        if largest_component:
            components, n = ndimage.label(mask, structure=COMPONENT_STRUCTURE)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                keep = components == int(np.argmax(sizes))
                del components
                labels[mask & ~keep] = 0
                mask = keep
        if fill_holes:
            filled = ndimage.binary_fill_holes(mask)
            labels[filled & (labels == 0)] = value
    return labels
