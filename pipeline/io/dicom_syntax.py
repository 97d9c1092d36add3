"""Byte-level facts of a DICOM file that a header read does not give.

Two questions are answered from the bytes themselves, never assumed:

- How is the data set encoded when the file meta does not say (old archives write neither the
  128-byte preamble nor a file meta group)? The first data element tells: two upper-case VR letters
  after its tag mean explicit VR, and a group number written high byte first means big endian.
- Are all the pixel data there? Native pixel data must hold Rows x Columns x frames x samples x
  BitsAllocated bits; encapsulated pixel data are a run of items that must each end inside the file
  and be closed by a sequence delimiter. Both are checked by seeking, without reading the pixels.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from pipeline.errors import InputRejected, Reason

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"  # retired, still met in archives
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

# Native (uncompressed) syntaxes: uid -> (implicit VR, little endian).
NATIVE = {IMPLICIT_LE: (True, True), EXPLICIT_LE: (False, True), EXPLICIT_BE: (False, False)}
_BY_ENCODING = {encoding: uid for uid, encoding in NATIVE.items()}

# Every VR of PS3.5 Table 6.2-1; in explicit VR these two bytes follow the tag.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    b"US UT UV".split()
)
# VRs whose explicit element header has 2 reserved bytes and a 32-bit length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

PIXEL_DATA = (0x7FE0, 0x0010)
_ITEM, _SEQUENCE_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_UNDEFINED = 0xFFFFFFFF


def data_set_start(fh: BinaryIO) -> int:
    """Byte offset of the first data set element: after the preamble and any group 0002 (meta).

    The file meta group is explicit VR little endian by definition (PS3.10 7.1), also when a file
    carries it without the preamble. Leaves `fh` at an unspecified position.
    """
    fh.seek(0)
    pos = 132 if fh.read(132)[128:132] == b"DICM" else 0
    size = os.fstat(fh.fileno()).st_size
    while pos < size:
        fh.seek(pos)
        head = fh.read(12)
        if len(head) < 8 or head[:2] != b"\x02\x00" or head[4:6] not in _VRS:
            break
        if head[4:6] in _LONG_VRS:
            if len(head) < 12:
                break
            length = struct.unpack("<I", head[8:12])[0]
            if length == _UNDEFINED:
                break  # not a meta element: leave the rest to the data set parser
            pos += 12 + length
        else:
            pos += 8 + struct.unpack("<H", head[6:8])[0]
    return pos


def sniff_encoding(first: bytes) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a data set from the first 6 bytes of its first element.

    Little vs big endian: data set groups are small even numbers (0x0008, 0x0010, ...), so a group
    whose first byte is 0 and second is not was written high byte first. Explicit VR: bytes 4-5
    are one of the VR names. None when fewer than 6 bytes are given.
    """
    if len(first) < 6:
        return None
    little = not (first[0] == 0 and first[1] != 0)
    return (first[4:6] not in _VRS, little)


def looks_like_data_set(head: bytes, size: int) -> bool:
    """Whether a file without the 'DICM' preamble starts with a DICOM data set (old archives).

    The first element must be in group 0002 (file meta) or 0008 and well formed: explicit VR with
    a VR name, or implicit VR with a length that fits in the file and, when the next element
    starts within `head`, is followed by a later tag. Random bytes that happen to start with
    08 00 are not taken for DICOM.
    """
    sniffed = sniff_encoding(head)
    if sniffed is None or len(head) < 8:
        return False
    implicit, little = sniffed
    endian = "<" if little else ">"
    tag = struct.unpack(endian + "HH", head[:4])
    if tag[0] not in (0x0002, 0x0008):
        return False
    if not implicit:
        return True
    length = struct.unpack(endian + "I", head[4:8])[0]
    if length == _UNDEFINED:
        return True  # a sequence of undefined length: its items follow
    if 8 + length > size:
        return False
    following = 8 + length
    if following + 4 <= len(head):
        return struct.unpack(endian + "HH", head[following : following + 4]) > tag
    return True


def effective_syntax(declared: str | None, sniffed: tuple[bool, bool] | None, rel: str) -> str:
    """The transfer syntax the data set is really encoded in.

    A file meta that names a compressed or deflated syntax is trusted (its data set is explicit VR
    little endian or compressed as a whole). For a native syntax the VR encoding is taken from the
    data, as pydicom's reader does when the two disagree. Without a declared syntax the data decide.
    Raises UNREADABLE for implicit VR big endian, which no DICOM transfer syntax is.
    """
    if declared and declared not in NATIVE:
        return declared
    if sniffed is None:
        return declared or IMPLICIT_LE
    implicit, little = sniffed
    if declared:
        little = NATIVE[declared][1]
    if implicit and not little:
        raise InputRejected(
            Reason.UNREADABLE,
            rel,
            "the data set is written implicit VR big endian, which is not a DICOM transfer syntax "
            "(a damaged or non-DICOM file?); re-export it.",
        )
    return _BY_ENCODING[(implicit, little)]


def detect_transfer_syntax(fh: BinaryIO, declared: str | None, rel: str) -> str:
    """`effective_syntax` of an open file, sniffing its first data set element."""
    start = data_set_start(fh)
    fh.seek(start)
    return effective_syntax(declared, sniff_encoding(fh.read(6)), rel)


def _truncated(rel: str, message: str, **details: int) -> InputRejected:
    return InputRejected(Reason.TRUNCATED, rel, message + " Re-export or re-copy the file.", details)


def check_pixel_data(fh: BinaryIO, syntax: str, expected: int, rel: str) -> int | None:
    """Check that the pixel data starting at `fh`'s position are all in the file.

    `fh` must sit where a header-only read stopped (at the Pixel Data element, or at the end of a
    file cut before it). Native data shorter than `expected` bytes, an encapsulated fragment that
    runs past the end of the file or a missing sequence delimiter raise TRUNCATED; a malformed
    fragment list raises UNREADABLE. Returns the byte offset of native pixel values with a
    defined length (the decoder may read them straight from there), else None.
    Deflated data sets are compressed as a whole: their pixel data are checked when decoded.
    """
    if syntax == DEFLATED_LE:
        return None
    start = fh.tell()
    size = os.fstat(fh.fileno()).st_size
    implicit, little = NATIVE.get(syntax, (False, True))  # encapsulated: explicit VR little endian
    endian = "<" if little else ">"
    head = fh.read(12)
    if len(head) < 8:
        raise _truncated(
            rel,
            f"the file ends at byte {size}, before its Pixel Data element; expected {expected} "
            "bytes of pixel data.",
            file_size=size,
            expected_pixel_bytes=expected,
        )
    if struct.unpack(endian + "HH", head[:4]) != PIXEL_DATA:
        return None  # Float/Double Float Pixel Data: checked when decoded
    if implicit:
        length, value_start = struct.unpack(endian + "I", head[4:8])[0], start + 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise _truncated(rel, "the file ends inside the Pixel Data element header.")
        length, value_start = struct.unpack(endian + "I", head[8:12])[0], start + 12
    else:  # a short VR on Pixel Data: non-conformant, but the length is still a length
        length, value_start = struct.unpack(endian + "H", head[6:8])[0], start + 8
    if length == _UNDEFINED:
        _check_fragments(fh, value_start, size, rel)
        return None
    available = size - value_start
    if syntax in NATIVE and (available < min(length, expected) or length < expected):
        found = int(min(length, available))
        raise _truncated(
            rel,
            f"pixel data hold {found} bytes but Rows x Columns x frames x bits declare {expected}; "
            "the file was cut short.",
            found_pixel_bytes=found,
            expected_pixel_bytes=expected,
        )
    if syntax not in NATIVE and available < length:
        raise _truncated(
            rel,
            f"the Pixel Data element declares {length} bytes; the file holds {available} after it.",
            found_pixel_bytes=int(available),
            declared_pixel_bytes=int(length),
        )
    return value_start if syntax in NATIVE else None


def _check_fragments(fh: BinaryIO, pos: int, size: int, rel: str) -> None:
    """Walk the items of encapsulated pixel data by their lengths (no fragment is read)."""
    n_items = 0
    while True:
        fh.seek(pos)
        head = fh.read(8)
        if len(head) < 8:
            raise _truncated(
                rel,
                f"encapsulated pixel data end at byte {size} after {n_items} item(s) without their "
                "closing sequence delimiter; the file was cut short.",
                file_size=size,
                items=n_items,
            )
        group, element, length = struct.unpack("<HHI", head)
        if (group, element) == _SEQUENCE_DELIMITER:
            if n_items < 2:  # the basic offset table item, then at least one fragment
                raise InputRejected(
                    Reason.UNREADABLE,
                    rel,
                    "encapsulated pixel data hold no fragment (only an offset table); re-export it.",
                )
            return
        if (group, element) != _ITEM or length == _UNDEFINED:
            raise InputRejected(
                Reason.UNREADABLE,
                rel,
                f"encapsulated pixel data: expected an item or a sequence delimiter at byte {pos}, "
                f"found tag ({group:04X},{element:04X}); the fragment list is damaged.",
            )
        if pos + 8 + length > size:
            raise _truncated(
                rel,
                f"fragment {n_items} of the encapsulated pixel data declares {length} bytes from byte "
                f"{pos + 8}, past the end of the file at byte {size}; the file was cut short.",
                file_size=size,
                fragment=n_items,
                fragment_bytes=length,
            )
        n_items += 1
        pos += 8 + length
