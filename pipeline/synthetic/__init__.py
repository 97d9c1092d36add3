"""Generated data for tests, benchmarks and the demo: real DICOM and NIfTI files, never downloads."""
