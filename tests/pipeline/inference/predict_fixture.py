"""A tiny demo dataset and an untrained model saved with its plan, for the predict tests.

Speed does not depend on the weights and every geometric property is checked on whatever the
network outputs, so the model is an untrained UNet (base 4) with a plan built from the demo's
MSD copy ingested into a staging folder, saved with `save_model_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import PipelineConfig
from pipeline.ingest import ingest
from pipeline.io.model_dir import save_model_dir
from pipeline.planning.plan import Plan, plan_dataset
from pipeline.synthetic.dataset import DemoDatasetInfo, make_demo_dataset
from unet_model import UNet, UNetConfig


@dataclass
class PredictSetup:
    root: Path
    demo: DemoDatasetInfo
    staging: Path
    plan: Plan
    model_dir: Path
    secret: Path


def save_untrained_model(plan: Plan, out: Path, seed: int = 0, base: int = 4) -> Path:
    torch.manual_seed(seed)
    model = UNet(
        UNetConfig(in_channels=plan.context_slices, num_classes=plan.num_classes, base_channels=base)
    )
    config = PipelineConfig().replace(model={"base_channels": base}).to_dict()
    return save_model_dir(model, out, plan=plan.to_dict(), config=config, label_names=plan.label_names)


def make_predict_setup(root: Path, n_cases: int = 6, size: int = 32) -> PredictSetup:
    demo = make_demo_dataset(root / "demo", n_cases=n_cases, size=size)
    secret = root / "site-secret"
    staging = root / "staging"
    ingest(demo.msd_root, staging, secret_file=secret, workers=1)
    plan = plan_dataset(staging)
    model_dir = save_untrained_model(plan, root / "model")
    return PredictSetup(root, demo, staging, plan, model_dir, secret)
