"""Readers and writers of the formats hospitals hand us (DICOM, DICOM SEG, NIfTI, dataset layouts)
and of the one we hand on: the model folder (`model_dir`: safetensors weights and JSON, no pickle),
written by training and read by tracking and inference alike."""
