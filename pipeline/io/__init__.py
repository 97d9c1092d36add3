"""Readers and writers of the formats hospitals hand us: DICOM, DICOM SEG, NIfTI, dataset layouts."""
