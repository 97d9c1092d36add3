"""Training: staged, planned cases -> a U-Net, validated as predict predicts. In run order:

- `data`: case splits, the cached training datasets and the threaded loader;
- `augment`: random 2D slices of the planned volumes, augmented (training only);
- `distributed`: the process group (torchrun), destroyed however the run ends;
- `loop`: `train` (the `LoopState` from epoch to epoch; `train_epoch`, `validate_epoch`);
- `ema`: the moving average of the weights that validation scores and the model folder holds;
- `checkpoint`: what checkpoints/last.pt and best.pt hold, written and read in one place;
- `validate`: whole validation cases through inference's predictor, scored by `metrics`;
- `metrics`: Dice and HD95 per label (validation and the `evaluate` command);
- `result`: what a run leaves: result.json, the curves, the model folder.
"""
