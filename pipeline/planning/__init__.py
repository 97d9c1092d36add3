"""Planning: the preprocessing decisions made once per dataset, and the transforms that apply them.

- `plan`: the dataset fingerprint and the `Plan` (slice axis, spacing, normalization, patch size,
  2.5-D context, class weights), saved beside the model so inference applies exactly what training
  did, and `context_indices`, the one rule for a slice's neighbours;
- `network`: the U-Net's base width and the batch size for the training device, with reasons;
- `transforms`: the deterministic MONAI chain the plan defines, shared by training, validation and
  inference (`preprocess_volume`, `restore_labels`).
"""
