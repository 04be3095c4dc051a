"""Tiny fixture trees in each dataset's on-disk layout (../shared/DATASETS.md), for data tests.

Each writer builds 3-6 rows with small images into a folder and returns that folder. No tests
here: test_formats.py, test_data_*.py import these writers.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int = 0, mode: str = "RGB", size: tuple[int, int] = (20, 16)):
    """A small random image; the format follows the suffix (.jpg / .jpeg / .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(f"{path.name}{seed}".encode()))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


def write_dicom(path: Path, patient: str, bits: int = 8, size: int = 24) -> Path:
    """A MONOCHROME2 DICOM (explicit VR little endian), uint8 or uint16 pixels."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    dtype = np.uint8 if bits == 8 else np.uint16
    pixels = (np.arange(size * size).reshape(size, size) % (2**bits)).astype(dtype)
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=bits)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


HAM_ROWS = (
    # lesion_id, image_id, dx: HAM_0000001 has two images (the edge case)
    ("HAM_0000001", "ISIC_0000001", "bkl"),
    ("HAM_0000001", "ISIC_0000002", "bkl"),
    ("HAM_0000002", "ISIC_0000003", "mel"),
    ("HAM_0000003", "ISIC_0000004", "nv"),
    ("HAM_0000004", "ISIC_0000005", "df"),
    ("HAM_0000005", "ISIC_0000006", "vasc"),
)


def ham_tree(root: Path, eight_columns: bool = False, official: bool = False) -> Path:
    header = "lesion_id,image_id,dx,dx_type,age,sex,localization"
    lines = [header + (",dataset" if eight_columns else "")]
    for i, (lesion, image, dx) in enumerate(HAM_ROWS):
        extra = ",vidir_modern" if eight_columns else ""
        lines.append(f"{lesion},{image},{dx},histo,{40 + i}.0,male,back{extra}")
        folder = "HAM10000_images_part_1" if i < 3 else "HAM10000_images_part_2"
        write_image(root / folder / f"{image}.jpg")
    write_csv(root / "HAM10000_metadata.csv", lines)
    if official:
        gt_header = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
        val = ["ISIC_0034321,0.0,1.0,0.0,0.0,0.0,0.0,0.0"]
        test = ["ISIC_0034524,1.0,0.0,0.0,0.0,0.0,0.0,0.0", "ISIC_0034525,0,0,0,1,0,0,0"]
        name = "ISIC2018_Task3_Validation_GroundTruth"
        write_csv(root / name / f"{name}.csv", [gt_header, *val])  # in its own folder
        write_csv(root / "ISIC2018_Task3_Test_GroundTruth.csv", [gt_header, *test])
        for row in val:
            write_image(root / "ISIC2018_Task3_Validation_Input" / f"{row[:12]}.jpg")
        for row in test:
            write_image(root / "ISIC2018_Task3_Test_Input" / f"{row[:12]}.jpg")
    return root


def isic2019_tree(root: Path) -> Path:
    lines = ["image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"]
    meta = ["image,age_approx,anatom_site_general,lesion_id,sex"]
    rows = [
        ("ISIC_0000000", 1, "BLACK_0001"),
        ("ISIC_0000001", 0, "BLACK_0001"),
        ("ISIC_0000002_downsampled", 7, ""),
        ("ISIC_0000003", 2, "BLACK_0002"),
        ("ISIC_0000004", 3, ""),
    ]
    for image, cls, lesion in rows:
        hot = ["0.0"] * 9
        hot[cls] = "1.0"
        lines.append(",".join([image, *hot]))
        meta.append(f"{image},55.0,anterior torso,{lesion},female")
        write_image(root / "ISIC_2019_Training_Input" / f"{image}.jpg")
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", lines)
    write_csv(root / "ISIC_2019_Training_Metadata.csv", meta)
    return root


def aptos_tree(root: Path) -> Path:
    ids = ["000c1434d8d7", "001639a390f0", "0024cdab0c1e", "002c21358ce6", "005b95c28852"]
    write_csv(root / "train.csv", ["id_code,diagnosis"] + [f"{c},{i}" for i, c in enumerate(ids)])
    for code in ids:
        write_image(root / "train_images" / f"{code}.png")
    return root


def eyepacs_tree(root: Path, with_test: bool = False) -> Path:
    rows = [("10_left", 0), ("10_right", 1), ("13_left", 4), ("13_right", 2), ("15_left", 3)]
    write_csv(root / "trainLabels.csv", ["image,level"] + [f"{i},{v}" for i, v in rows])
    for image, _ in rows:
        write_image(root / "train" / f"{image}.jpeg")
    if with_test:
        test = [("1_left", 0, "Private"), ("1_right", 2, "Public")]
        write_csv(
            root / "retinopathy_solution.csv",
            ["image,level,Usage"] + [f"{i},{v},{u}" for i, v, u in test],
        )
        for image, _, _ in test:
            write_image(root / "test" / f"{image}.jpeg")
    return root


CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)


def chexpert_row(path: str, values: list[str], view: str = "Frontal") -> str:
    """values: the 14 observation cells in order ('' = blank)."""
    return ",".join([path, "Female", "68", view, "AP" if view == "Frontal" else "", *values])


def chexpert_tree(root: Path) -> Path:
    """root/CheXpert-v1.0-small/...; patient00001 row has Cardiomegaly -1 and Edema blank."""
    base = root / "CheXpert-v1.0-small"
    blank14 = [""] * 14
    first = list(blank14)
    first[2], first[3], first[5] = "-1.0", "1.0", ""  # Cardiomegaly -1, Lung Opacity 1, Edema ''
    first[6] = "0.0"  # Consolidation 0
    train = [
        ("train/patient00001/study1/view1_frontal.jpg", first, "Frontal"),
        ("train/patient00001/study1/view2_lateral.jpg", ["1.0", *blank14[1:]], "Lateral"),
        ("train/patient00002/study1/view1_frontal.jpg", ["1.0", *blank14[1:]], "Frontal"),
        ("train/patient00003/study2/view1_frontal.jpg", ["", "1.0", *blank14[2:]], "Frontal"),
    ]
    valid = [("valid/patient64541/study1/view1_frontal.jpg", ["0.0"] * 13 + ["1.0"], "Frontal")]
    for name, rows in (("train.csv", train), ("valid.csv", valid)):
        lines = [CHEXPERT_HEADER]
        for rel, values, view in rows:
            lines.append(chexpert_row(f"CheXpert-v1.0-small/{rel}", values, view))
            write_image(base / rel, mode="L")
        write_csv(base / name, lines)
    return root


RSNA_PATIENTS = (
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6",
    "00313ee0-9eaa-42f4-b0ab-c148ed3241cd",
    "00322d4d-1c29-4943-afc9-b6754be640eb",
    "00436515-870c-4b36-a041-de91049b9ab4",
)


def rsna_tree(root: Path) -> Path:
    """Patient 4 has two boxes (two Target 1 rows): one positive image."""
    p = RSNA_PATIENTS
    write_csv(
        root / "stage_2_train_labels.csv",
        [
            "patientId,x,y,width,height,Target",
            f"{p[0]},,,,,0",
            f"{p[1]},,,,,0",
            f"{p[2]},,,,,0",
            f"{p[3]},264.0,152.0,213.0,379.0,1",
            f"{p[3]},562.0,152.0,256.0,453.0,1",
        ],
    )
    write_csv(
        root / "stage_2_detailed_class_info.csv",
        [
            "patientId,class",
            f"{p[0]},No Lung Opacity / Not Normal",
            f"{p[1]},Normal",
            f"{p[2]},Normal",
            f"{p[3]},Lung Opacity",
            f"{p[3]},Lung Opacity",
        ],
    )
    for i, patient in enumerate(p):
        write_dicom(root / "stage_2_train_images" / f"{patient}.dcm", patient, 16 if i else 8)
    return root


NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
NIH_ROWS = (
    ("00000001_000.png", "Cardiomegaly", "1"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1"),
    ("00000002_000.png", "No Finding", "2"),
    ("00000003_000.png", "Hernia|Infiltration", "3"),
    ("00000004_000.png", "Effusion", "4"),
)


def nih_tree(root: Path) -> Path:
    """Data_Entry_2017.csv with the bracket-comma header and a trailing comma on every line."""
    lines = [NIH_HEADER]
    for i, (image, labels, patient) in enumerate(NIH_ROWS):
        lines.append(f"{image},{labels},{i},{patient},58,M,PA,2682,2749,0.143,0.143,")
        folder = "images_001/images" if i < 3 else "images_002/images"
        write_image(root / folder / image, mode="L")
    write_csv(root / "Data_Entry_2017.csv", lines)
    write_csv(root / "train_val_list.txt", [r[0] for r in NIH_ROWS[:3]])
    write_csv(root / "test_list.txt", [r[0] for r in NIH_ROWS[3:]])
    return root


def folder_tree(root: Path, per_class: int = 3, mode: str = "RGB") -> Path:
    for cls in ("benign", "malignant"):
        for i in range(per_class):
            write_image(root / cls / f"{cls}_{i}.png", mode=mode)
    return root


def csv_tree(root: Path) -> Path:
    rows = [
        ("a.png", "cat", "p1"),
        ("b.png", "dog", "p1"),
        ("sub/c.png", "dog", "p2"),
        ("d.png", "cat", "p3"),
        ("e.png", "bird", "p4"),
    ]
    lines = ["file,kind,patient"] + [",".join(r) for r in rows]
    for rel, _, _ in rows:
        write_image(root / "imgs" / rel)
    write_csv(root / "labels.csv", lines)
    return root
