"""How a proxy study departs from the MedMerge paper, in words every study's report shares: the
modality of each MedMNIST flag, a source's relation to the target, the departure clauses."""

from __future__ import annotations

from collections.abc import Mapping

from simulations.study import PRETRAIN, describe_source, pretrain_recipe

# What a MedMNIST flag images: (modality, in words). Two flags share a modality when the first
# items are equal; the paper's second sources (HAM10K, EyePACS, CheXpert) share their target's.
MODALITY = {
    "breastmnist": ("ultrasound", "breast ultrasound"),
    "pneumoniamnist": ("x-ray", "pediatric chest X-ray"),
    "chestmnist": ("x-ray", "chest X-ray"),
    "organamnist": ("ct", "abdominal CT"),
    "organcmnist": ("ct", "abdominal CT"),
    "organsmnist": ("ct", "abdominal CT"),
    "dermamnist": ("dermatoscopy", "dermatoscopy"),
    "retinamnist": ("fundus", "retinal fundus photography"),
    "octmnist": ("oct", "retinal OCT"),
    "pathmnist": ("pathology", "colon pathology"),
    "bloodmnist": ("microscopy", "blood cell microscopy"),
    "tissuemnist": ("microscopy", "kidney cortex microscopy"),
}
PAPER_TARGETS = "the paper's 224x224 ISIC-2019, APTOS and RSNA-Pneumonia"
PAPER_SECOND_SOURCES = "HAM10K, EyePACS or CheXpert"


def modality_relation(source: str, target: str) -> tuple[str, str]:
    """('same-modality' / 'cross-modality' / '', words) for a source pretrained on the MedMNIST
    flag `source` and a target flag; ('', '') when either modality is unknown."""
    if source not in MODALITY or target not in MODALITY:
        return "", ""
    kind = "same-modality" if MODALITY[source][0] == MODALITY[target][0] else "cross-modality"
    return kind, f"{MODALITY[source][1]}: a {kind} source for this {MODALITY[target][1]} target"


def source_words(spec: str, target: str) -> str:
    """A source spec in words; for a source pretrained on a MedMNIST flag, also whether it
    shares the target's modality."""
    text = describe_source(spec)
    if spec.startswith(PRETRAIN):
        relation = modality_relation(pretrain_recipe(spec)[0], target)[1]
        if relation:
            text += f" ({relation})"
    return text


def _short_source(spec: str) -> str:
    """A source in a few words, for the departure sentence."""
    if spec.startswith("cifar10:"):
        return f"the CIFAR-10 `{spec}` weights"
    if spec.startswith(PRETRAIN):
        dataset = pretrain_recipe(spec)[0]
        kind = MODALITY.get(dataset, ("", ""))[1]
        return f"a network pretrained on {dataset}" + (f" ({kind})" if kind else "")
    return describe_source(spec)


def departure_text(target: str, image_size: int, arch: str, sources: Mapping[str, str]) -> str:
    """The clauses that say how a proxy of the MedMerge protocol departs from the paper: its
    images, backbone and sources (`sources`: name -> spec, A and B used)."""
    images = "28x28 MedMNIST" + (f" (resized to {image_size})" if image_size != 28 else "")
    target_kind = MODALITY.get(target, ("", ""))[1]
    clauses = [
        f"{images} {target} images{f' ({target_kind})' if target_kind else ''} instead of "
        f"{PAPER_TARGETS}",
        f"a {arch} instead of DenseNet-121 / ResNet-50",
    ]
    if "A" in sources:
        clauses.append(f"{_short_source(sources['A'])} as Source A instead of ImageNet-1K")
    if "B" in sources:
        spec = sources["B"]
        kind = ""
        if spec.startswith(PRETRAIN):
            kind = modality_relation(pretrain_recipe(spec)[0], target)[0]
        tail = {
            "cross-modality": f", a cross-modality source for this {target_kind} target, where "
            f"the paper's second source ({PAPER_SECOND_SOURCES}) shares the target's modality",
            "same-modality": f", a same-modality source for this {target_kind} target, as the "
            f"paper's second sources ({PAPER_SECOND_SOURCES}) are for theirs",
        }.get(kind, f" in place of the paper's {PAPER_SECOND_SOURCES}")
        clauses.append(f"{_short_source(spec)} as Source B{tail}")
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]
