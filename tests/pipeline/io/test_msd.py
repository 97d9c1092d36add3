"""MSD / nnU-Net raw datasets: the dataset.json dialects, channels, missing files, ._ files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import InputRejected, Reason
from pipeline.io.msd import is_msd_dataset, read_msd_dataset
from pipeline.io.nifti import NiftiCase

MSD_JSON = {
    "name": "Liver",
    "modality": {"0": "CT"},
    "labels": {"0": "background", "1": "liver", "2": "cancer"},
    "numTraining": 2,
    "numTest": 1,
    "training": [
        {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"},
        {"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"},
    ],
    "test": ["./imagesTs/liver_9.nii.gz"],
}
V2_JSON = {
    "channel_names": {"0": "T2", "1": "ADC"},
    "labels": {"background": 0, "PZ": 1, "TZ": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}


def make(root: Path, meta: dict | str, files: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")  # the reader never opens images: names are the layout
    return root


def accounted(ds, root: Path) -> None:
    """Every file under the three folders is in exactly one case or one rejection."""
    present = sorted(
        p.relative_to(root).as_posix()
        for folder in ("imagesTr", "labelsTr", "imagesTs")
        if (root / folder).is_dir()
        for p in (root / folder).rglob("*")
        if p.is_file()
    )
    used = [f for c in ds.cases for f in (*c.channels, *([c.label] if c.label else []))]
    used += [r.path for r in ds.rejected]
    assert sorted(used) == present


def test_msd_style(tmp_path):
    files = [
        "imagesTr/liver_0.nii.gz",
        "labelsTr/liver_0.nii.gz",
        "imagesTr/liver_1.nii.gz",
        "labelsTr/liver_1.nii.gz",
        "imagesTs/liver_9.nii.gz",
        "imagesTr/._liver_0.nii.gz",
        "labelsTr/._liver_0.nii.gz",
        "imagesTs/._liver_9.nii.gz",
    ]
    root = make(tmp_path / "Task03_Liver", MSD_JSON, files)
    assert is_msd_dataset(root)
    ds = read_msd_dataset(root)
    assert ds.name == "Liver"
    assert ds.labels == {"background": 0, "liver": 1, "cancer": 2}
    assert ds.allowed_labels == {0, 1, 2}
    assert ds.channels == {0: "CT"}
    assert ds.file_ending == ".nii.gz"
    assert ds.cases == [
        NiftiCase(
            "imagesTr/liver_0.nii.gz", "imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz", split="training"
        ),
        NiftiCase(
            "imagesTr/liver_1.nii.gz", "imagesTr/liver_1.nii.gz", "labelsTr/liver_1.nii.gz", split="training"
        ),
        NiftiCase("imagesTs/liver_9.nii.gz", "imagesTs/liver_9.nii.gz", None, split="test"),
    ]
    assert {(r.path, r.reason) for r in ds.rejected} == {
        ("imagesTr/._liver_0.nii.gz", Reason.NOT_DICOM),
        ("labelsTr/._liver_0.nii.gz", Reason.NOT_DICOM),
        ("imagesTs/._liver_9.nii.gz", Reason.NOT_DICOM),
    }
    assert ds.missing == [] and ds.notes == []
    accounted(ds, root)


def test_nnunet_v2_style_with_channels(tmp_path):
    files = [
        "imagesTr/prostate_00_0001.nii.gz",
        "imagesTr/prostate_00_0000.nii.gz",
        "labelsTr/prostate_00.nii.gz",
        "imagesTr/prostate_01_0000.nii.gz",
        "imagesTr/prostate_01_0001.nii.gz",
        "labelsTr/prostate_01.nii.gz",
        "imagesTs/prostate_07_0000.nii.gz",
        "imagesTs/prostate_07_0001.nii.gz",
        "imagesTr/.DS_Store",
    ]
    root = make(tmp_path / "Dataset005_Prostate", V2_JSON, files)
    ds = read_msd_dataset(root)
    assert ds.labels == {"background": 0, "PZ": 1, "TZ": 2}
    assert ds.channels == {0: "T2", 1: "ADC"}
    assert [(c.key, c.channels, c.label, c.split) for c in ds.cases] == [
        (
            "imagesTr/prostate_00_0000.nii.gz",
            ("imagesTr/prostate_00_0000.nii.gz", "imagesTr/prostate_00_0001.nii.gz"),
            "labelsTr/prostate_00.nii.gz",
            "training",
        ),
        (
            "imagesTr/prostate_01_0000.nii.gz",
            ("imagesTr/prostate_01_0000.nii.gz", "imagesTr/prostate_01_0001.nii.gz"),
            "labelsTr/prostate_01.nii.gz",
            "training",
        ),
        (
            "imagesTs/prostate_07_0000.nii.gz",
            ("imagesTs/prostate_07_0000.nii.gz", "imagesTs/prostate_07_0001.nii.gz"),
            None,
            "test",
        ),
    ]
    assert [(r.path, r.reason) for r in ds.rejected] == [("imagesTr/.DS_Store", Reason.NOT_DICOM)]
    accounted(ds, root)


def test_nnunet_v2_regions_and_nii_ending(tmp_path):
    meta = {
        "channel_names": {"0": "FLAIR"},
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3},
        "file_ending": ".nii",
    }
    root = make(tmp_path / "ds", meta, ["imagesTr/b_1_0000.nii", "labelsTr/b_1.nii"])
    ds = read_msd_dataset(root)
    assert ds.labels == {"background": 0, "enhancing": 3}
    assert ds.regions == {"whole tumor": (1, 2, 3), "tumor core": (2, 3)}
    assert ds.allowed_labels == {0, 1, 2, 3}
    assert [c.channels for c in ds.cases] == [("imagesTr/b_1_0000.nii",)]


def test_nnunet_v1_list_without_channel_suffix(tmp_path):
    meta = {
        **MSD_JSON,
        "modality": {"0": "CT", "1": "PET"},
        "numTraining": 1,
        "numTest": 0,
        "training": [{"image": "./imagesTr/p_1.nii.gz", "label": "./labelsTr/p_1.nii.gz"}],
        "test": [],
    }
    root = make(
        tmp_path / "v1", meta, ["imagesTr/p_1_0000.nii.gz", "imagesTr/p_1_0001.nii.gz", "labelsTr/p_1.nii.gz"]
    )
    ds = read_msd_dataset(root)
    assert [c.channels for c in ds.cases] == [("imagesTr/p_1_0000.nii.gz", "imagesTr/p_1_0001.nii.gz")]
    assert ds.rejected == [] and ds.notes == []


def test_missing_files_reject_their_case_only(tmp_path):
    meta = {
        **MSD_JSON,
        "training": [
            {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"},  # fine
            {"image": "imagesTr/liver_0.nii.gz", "label": "labelsTr/liver_0.nii.gz"},  # listed twice
            {"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"},  # label missing
            {"image": "./imagesTr/liver_2.nii.gz", "label": "./labelsTr/liver_2.nii.gz"},  # image missing
            {"image": "../../etc/passwd", "label": "./labelsTr/liver_3.nii.gz"},  # outside the dataset
        ],
    }
    files = [
        "imagesTr/liver_0.nii.gz",
        "labelsTr/liver_0.nii.gz",
        "imagesTr/liver_1.nii.gz",
        "labelsTr/liver_2.nii.gz",
        "labelsTr/liver_3.nii.gz",
        "imagesTr/liver_5.nii.gz",
        "imagesTs/liver_9.nii.gz",
    ]
    root = make(tmp_path / "Task03_Liver", meta, files)
    ds = read_msd_dataset(root)
    assert [c.key for c in ds.cases] == ["imagesTr/liver_0.nii.gz", "imagesTs/liver_9.nii.gz"]
    assert {(r.path, r.reason) for r in ds.rejected} == {
        ("imagesTr/liver_1.nii.gz", Reason.INVALID_DATASET),
        ("labelsTr/liver_2.nii.gz", Reason.MISSING_LABEL_SOURCE),
        ("labelsTr/liver_3.nii.gz", Reason.MISSING_LABEL_SOURCE),
        ("imagesTr/liver_5.nii.gz", Reason.INVALID_DATASET),  # not listed in "training"
    }
    by_path = {r.path: r for r in ds.rejected}
    assert "its label labelsTr/liver_1.nii.gz is missing" in by_path["imagesTr/liver_1.nii.gz"].message
    assert "not listed in dataset.json 'training'" in by_path["imagesTr/liver_5.nii.gz"].message
    assert {(m.path, m.details.get("missing_file")) for m in ds.missing} == {
        ("labelsTr/liver_1.nii.gz", True),
        ("imagesTr/liver_2.nii.gz", True),
        ("dataset.json", None),  # the entry outside the dataset and the one listed twice
    }
    assert len(ds.missing) == 4
    assert ds.notes == ["dataset.json numTraining is 2 but 1 valid training cases were found"]
    accounted(ds, root)


def test_v2_channel_and_label_problems(tmp_path):
    files = [
        "imagesTr/a_0000.nii.gz",
        "imagesTr/a_0001.nii.gz",
        "labelsTr/a.nii.gz",  # fine
        "imagesTr/b_0000.nii.gz",
        "labelsTr/b.nii.gz",  # channel 0001 missing
        "imagesTr/c_0000.nii.gz",
        "imagesTr/c_0001.nii.gz",  # no label
        "labelsTr/d.nii.gz",  # label without image
        "imagesTr/e_0000.nii",  # wrong ending
        "imagesTs/sub/f_0000.nii.gz",  # nested folder
    ]
    root = make(tmp_path / "ds", V2_JSON, files)
    ds = read_msd_dataset(root)
    assert [c.key for c in ds.cases] == ["imagesTr/a_0000.nii.gz"]
    assert {(r.path, r.reason) for r in ds.rejected} == {
        ("imagesTr/b_0000.nii.gz", Reason.INVALID_DATASET),
        ("labelsTr/b.nii.gz", Reason.INVALID_DATASET),
        ("imagesTr/c_0000.nii.gz", Reason.INVALID_DATASET),
        ("imagesTr/c_0001.nii.gz", Reason.INVALID_DATASET),
        ("labelsTr/d.nii.gz", Reason.MISSING_LABEL_SOURCE),
        ("imagesTr/e_0000.nii", Reason.INVALID_DATASET),
        ("imagesTs/sub/f_0000.nii.gz", Reason.INVALID_DATASET),
    }
    b = next(r for r in ds.rejected if r.path == "imagesTr/b_0000.nii.gz")
    assert b.details == {"expected_channels": 2, "found_channels": ["0000"]}
    accounted(ds, root)


def test_paths_relative_to_the_source_root(tmp_path):
    root = make(
        tmp_path / "src" / "Task03_Liver",
        {**MSD_JSON, "training": MSD_JSON["training"][:1], "numTraining": 1, "test": []},
        ["imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz"],
    )
    ds = read_msd_dataset(root, source_root=tmp_path / "src")
    assert ds.dataset_json == "Task03_Liver/dataset.json"
    assert ds.cases == [
        NiftiCase(
            "Task03_Liver/imagesTr/liver_0.nii.gz",
            "Task03_Liver/imagesTr/liver_0.nii.gz",
            "Task03_Liver/labelsTr/liver_0.nii.gz",
            split="training",
        )
    ]


@pytest.mark.parametrize(
    ("meta", "fragment"),
    [
        ("{not json", "cannot be read as JSON"),
        ({"modality": {"0": "CT"}}, "needs a non-empty 'labels'"),
        ({"labels": {"0": "background"}}, "'channel_names' (nnU-Net v2) or 'modality'"),
        ({**V2_JSON, "file_ending": ".mha"}, "file_ending '.mha' is not supported"),
        ({**V2_JSON, "labels": {"background": 0, "a": 1, "b": 1}}, "label values repeat"),
        ({**V2_JSON, "labels": {"background": 0, "x": "1"}}, "expected an integer or a list"),
        ({**V2_JSON, "labels": {"background": "zero"}}, "label value 'background' is not an integer"),
        ({**V2_JSON, "channel_names": {"0": "T2", "2": "ADC"}}, "channel indices must be 0..1"),
    ],
)
def test_dataset_json_that_cannot_be_understood(tmp_path, meta, fragment):
    root = make(tmp_path / "ds", meta, ["imagesTr/a_0000.nii.gz"])
    with pytest.raises(InputRejected) as info:
        read_msd_dataset(root)
    assert info.value.reason == Reason.INVALID_DATASET
    assert info.value.path == "dataset.json"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["dataset.json", "imagesTr/a.nii.gz"], True),
        (["dataset.json", "imagesTs/a.nii.gz"], True),
        (["imagesTr/a.nii.gz"], False),
        (["dataset.json", "images/a.nii.gz"], False),
    ],
)
def test_is_msd_dataset(tmp_path, files, expected):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert is_msd_dataset(tmp_path) is expected


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_dataset_json_with_or_without_a_byte_order_mark(tmp_path, encoding):
    files = ["imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz", "imagesTr/liver_1.nii.gz"]
    files += ["labelsTr/liver_1.nii.gz", "imagesTs/liver_9.nii.gz"]
    root = make(tmp_path / "Task03_Liver", {}, files)
    meta = {**MSD_JSON, "name": "Leber (Übung)"}  # a non-ASCII name too
    (root / "dataset.json").write_bytes(json.dumps(meta, ensure_ascii=False).encode(encoding))
    ds = read_msd_dataset(root)
    assert ds.name == "Leber (Übung)"
    assert len(ds.cases) == 3 and ds.rejected == [] and ds.missing == []


@pytest.mark.parametrize(
    "entry",
    [
        "../Task04/imagesTr/x.nii.gz",
        "./imagesTr/../../x.nii.gz",
        "/data/Task03_Liver/imagesTr/liver_0.nii.gz",  # absolute, even where it would land inside
        "C:\\data\\imagesTr\\liver_0.nii.gz",
        "\\\\server\\share\\liver_0.nii.gz",
    ],
)
def test_entries_outside_the_dataset_are_outside_root_and_never_read(tmp_path, entry):
    meta = {
        **MSD_JSON,
        "training": [
            {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"},
            {"image": entry, "label": "./labelsTr/liver_1.nii.gz"},
            {"image": "./imagesTr/liver_2.nii.gz", "label": entry},
        ],
        "test": [],
    }
    files = ["imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz", "labelsTr/liver_1.nii.gz"]
    files += ["imagesTr/liver_2.nii.gz"]
    root = make(tmp_path / "Task03_Liver", meta, files)
    ds = read_msd_dataset(root)
    assert [c.key for c in ds.cases] == ["imagesTr/liver_0.nii.gz"]
    outside = [m for m in ds.missing if m.reason == Reason.OUTSIDE_ROOT]
    assert [(m.path, m.details["entry"]) for m in outside] == [("dataset.json", entry)] * 2
    assert "training[1]" in outside[0].message and "training[2]" in outside[1].message
    assert {(r.path, r.reason) for r in ds.rejected} == {
        ("labelsTr/liver_1.nii.gz", Reason.MISSING_LABEL_SOURCE),
        ("imagesTr/liver_2.nii.gz", Reason.INVALID_DATASET),
    }
    accounted(ds, root)


def test_dot_dot_that_stays_inside_is_resolved_by_name(tmp_path):
    meta = {
        **MSD_JSON,
        "training": [
            {"image": "imagesTs/../imagesTr/liver_0.nii.gz", "label": "./labelsTr/./liver_0.nii.gz"}
        ],
        "test": [],
    }
    root = make(tmp_path / "T", meta, ["imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz"])
    ds = read_msd_dataset(root)
    assert [(c.image, c.label) for c in ds.cases] == [("imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz")]


def test_only_the_screened_files_are_present(tmp_path):
    """A file the caller screened out (a link leaving the source) is absent, not read."""
    files = ["imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz", "imagesTr/liver_1.nii.gz"]
    files += ["labelsTr/liver_1.nii.gz", "imagesTs/liver_9.nii.gz"]
    root = make(tmp_path / "Task03_Liver", MSD_JSON, files)
    screened = [root / f for f in files if f != "imagesTr/liver_1.nii.gz"]
    ds = read_msd_dataset(root, files=screened)
    assert [c.key for c in ds.cases] == ["imagesTr/liver_0.nii.gz", "imagesTs/liver_9.nii.gz"]
    assert {(r.path, r.reason) for r in ds.rejected} == {
        ("labelsTr/liver_1.nii.gz", Reason.MISSING_LABEL_SOURCE)
    }
