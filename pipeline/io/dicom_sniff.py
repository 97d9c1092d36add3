"""Is this DICOM at all? A strict look at the first bytes of a file without the 'DICM' preamble.

Old archives hold DICOM data sets without the 128-byte preamble and file meta; they start with
an element of group 0002 or 0008. So do raw voxel dumps whose first value happens to be 2 or 8.
Read as DICOM, such a dump yields a garbage data set that gets quarantined as an unknown SOP
class instead of ignored as not DICOM. `plausible_start` tells them apart from the elements
themselves: a real data set's first elements are public tags of the data dictionary, in
ascending order, with the dictionary's VR (explicit VR) and short, even value lengths.
"""

from __future__ import annotations

import struct

from pydicom.datadict import DicomDictionary, dictionary_VR

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _plausible_elements(head: bytes, endian: str, explicit: bool) -> bool:
    """The elements that start in `head` are public tags of the data dictionary in ascending order,
    with the VR the dictionary gives (explicit) or a length that a group length or a sequence
    allows (implicit); at least the first one must be."""
    pos, previous, seen = 0, -1, 0
    while pos + 8 <= len(head) and seen < 4:
        group, element = struct.unpack_from(endian + "HH", head, pos)
        tag = group << 16 | element
        if tag <= previous or (seen == 0 and group not in (0x0002, 0x0008)):
            return False
        if element != 0 and tag not in DicomDictionary:
            return False
        expected_vr = "UL" if element == 0 else dictionary_VR(tag)
        if explicit:
            vr = head[pos + 4 : pos + 6]
            if not (vr.isalpha() and vr.isupper()) or vr.decode("ascii") not in expected_vr.split(" or "):
                return False
            if vr in _LONG_VRS:
                if pos + 12 > len(head):
                    break
                if head[pos + 6 : pos + 8] != b"\0\0":
                    return False
                length, size = struct.unpack_from(endian + "I", head, pos + 8)[0], 12
            else:
                length, size = struct.unpack_from(endian + "H", head, pos + 6)[0], 8
        else:
            length, size = struct.unpack_from(endian + "I", head, pos + 4)[0], 8
        if length == 0xFFFFFFFF:
            return "SQ" in expected_vr or (explicit and vr in (b"OB", b"OW", b"UN"))
        # Value lengths are even; the elements of groups 0002/0008 that are not sequences or
        # binary are short strings and numbers (a 64 KiB UI is a voxel dump read as a length).
        short = not (explicit and vr in _LONG_VRS) and "SQ" not in expected_vr
        if length % 2 or (element == 0 and length != 4) or (short and length > 1024):
            return False
        seen += 1
        previous, pos = tag, pos + size + length
    return seen > 0


def plausible_start(head: bytes) -> bool:
    """Whether `head` (the first bytes of a file) starts like a DICOM data set in any of the
    byte orders and VR encodings (explicit or implicit VR, little or big endian)."""
    return any(_plausible_elements(head, endian, explicit) for endian in "<>" for explicit in (True, False))
