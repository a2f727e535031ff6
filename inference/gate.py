"""The input gate: a chest model only scores frontal chest radiographs.

Two layers, cheapest first:

1. **Header rules** on the DICOM attributes (Modality, Body Part Examined, View Position
   and View Code Sequence, Image Laterality, species, descriptions, matrix size). They
   refuse what the header already says is not a frontal human chest radiograph.
2. **Feature distance**: the Mahalanobis distance of the screen network's pooled features
   to the training features (Lee et al., NeurIPS 2018). It refuses images whose content
   the model has never seen, whatever their header claims (a dog thorax labelled THORAX,
   a dental film without a body part).

The gate also checks pixel *polarity*: a linear probe on the same features tells a
correctly displayed radiograph from an inverted one, catching MONOCHROME1 headers on
MONOCHROME2 pixels (and vice versa) that would otherwise be scored upside down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from pydicom.dataset import Dataset

RADIOGRAPH_MODALITIES = {"CR", "DX"}
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "LUNG", "CHEST_LAT"}
NON_FRONTAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LLO", "RLO", "LAO", "RAO", "LPO", "RPO", "LAT"}
MIN_MATRIX = 256  # pixels per side: below this no acquisition is a diagnostic chest film
# Words in descriptions that name another anatomy or a non-frontal projection.
_OTHER_ANATOMY = re.compile(
    r"\b(LAT|LATERAL|DECUB\w*|OBLIQUE|TEETH|DENTAL|PANO\w*|SKULL|HEAD|SPINE|PELVIS|HIP|"
    r"KNEE|TIBIA|FEMUR|ANKLE|FOOT|HAND|WRIST|ELBOW|SHOULDER|ABDOMEN|MAMMO\w*|BREAST)\b"
)


@dataclass(frozen=True)
class GateDecision:
    eligible: bool
    reason: str = ""


def check_header(ds: Dataset) -> GateDecision:
    """Header rules; the first rule that fails gives the reason."""
    modality = str(ds.get("Modality", "")).upper()
    if modality not in RADIOGRAPH_MODALITIES:
        return GateDecision(False, f"Modality {modality or '(empty)'} is not CR or DX")
    if "PixelData" not in ds:
        return GateDecision(False, "no Pixel Data")
    body_part = str(ds.get("BodyPartExamined", "")).upper().strip()
    if body_part not in CHEST_BODY_PARTS:
        return GateDecision(False, f"Body Part Examined {body_part} is not chest")
    view = str(ds.get("ViewPosition", "")).upper().strip()
    if view in NON_FRONTAL_VIEWS:
        return GateDecision(False, f"View Position {view} is not frontal (PA/AP)")
    for reason in (
        _view_code_reason(ds),
        _laterality_reason(ds),
        _species_reason(ds),
        _description_reason(ds),
        _matrix_reason(ds),
    ):
        if reason:
            return GateDecision(False, reason)
    return GateDecision(True)


def _view_code_reason(ds: Dataset) -> str:
    for item in ds.get("ViewCodeSequence", []):
        meaning = str(item.get("CodeMeaning", "")).lower()
        if any(word in meaning for word in ("lateral", "oblique", "decubitus")):
            return f"View Code Sequence says '{item.get('CodeMeaning')}', not frontal"
    return ""


def _laterality_reason(ds: Dataset) -> str:
    # A frontal chest covers both sides (U/B or absent); L or R marks a one-sided image.
    laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).upper()
    if laterality in ("L", "R"):
        return f"Image Laterality {laterality}: a one-sided view, not a frontal chest"
    return ""


def _species_reason(ds: Dataset) -> str:
    species = str(ds.get("PatientSpeciesDescription", "")).strip()
    if species and species.lower() not in ("homo sapiens", "human"):
        return f"Patient Species {species} is not human"
    if "PatientBreedDescription" in ds and str(ds.PatientBreedDescription).strip():
        return "a veterinary study (Patient Breed Description present)"
    return ""


def _description_reason(ds: Dataset) -> str:
    for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        text = str(ds.get(keyword, "")).upper()
        match = _OTHER_ANATOMY.search(text.replace("_", " "))
        if match:
            return f"{keyword} mentions {match.group(1)}: not a frontal chest radiograph"
    return ""


def _matrix_reason(ds: Dataset) -> str:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < MIN_MATRIX:
        return f"image matrix {cols}×{rows} is too small for a diagnostic chest radiograph"
    return ""


# --- feature statistics ---------------------------------------------------------------

SHRINKAGE = 0.1  # covariance shrinkage toward a scaled identity: 576 features, ~4k samples
DISTANCE_QUANTILE = 0.995  # of in-domain validation distances


def _fit_mahalanobis(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    centred = features - mean
    cov = centred.T @ centred / max(1, len(features) - 1)
    target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
    precision = np.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * target)
    return mean, precision


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = np.atleast_2d(features) - mean
    return np.sqrt(np.einsum("ij,jk,ik->i", centred, precision, centred))


def fit_gate(
    train_features: np.ndarray,
    val_features: np.ndarray,
    inverted_features: np.ndarray | None = None,
    extra_in_domain: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Feature statistics, the distance threshold and (optionally) the polarity probe.

    ``extra_in_domain`` adds features of other frontal chest radiographs (e.g. adults) to
    the reference set, so the gate's notion of "chest" is wider than the pediatric
    training data the classifier saw.
    """
    reference = (
        train_features if extra_in_domain is None else np.vstack([train_features, extra_in_domain])
    )
    mean, precision = _fit_mahalanobis(reference.astype(np.float64))
    val_dist = mahalanobis(val_features, mean, precision)
    stats = {
        "mean": torch.as_tensor(mean, dtype=torch.float64),
        "precision": torch.as_tensor(precision, dtype=torch.float64),
        "threshold": torch.tensor(float(np.quantile(val_dist, DISTANCE_QUANTILE))),
    }
    if inverted_features is not None:
        w, b = _fit_polarity_probe(train_features, inverted_features)
        stats["polarity_w"], stats["polarity_b"] = w, b
    return stats


def _fit_polarity_probe(
    normal: np.ndarray, inverted: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression: P(image is inverted | features)."""
    x = torch.as_tensor(np.vstack([normal, inverted]), dtype=torch.float32)
    y = torch.cat([torch.zeros(len(normal)), torch.ones(len(inverted))])
    scale = x.std(dim=0).clamp_min(1e-6)
    probe = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(probe(x / scale).squeeze(1), y)
            + 1e-3 * probe.weight.pow(2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return (probe.weight.detach().squeeze(0) / scale), probe.bias.detach().squeeze(0)


@dataclass(frozen=True)
class FeatureCheck:
    distance: float
    threshold: float
    inverted_probability: float | None

    @property
    def in_domain(self) -> bool:
        return self.distance <= self.threshold


def check_features(features: torch.Tensor, stats: dict[str, torch.Tensor]) -> list[FeatureCheck]:
    """Distance and polarity for a batch of pooled screen features (N×D)."""
    feats = features.detach().double()  # float32 loses the quadratic form to cancellation
    centred = feats - stats["mean"].double()
    quad = torch.einsum("ij,jk,ik->i", centred, stats["precision"].double(), centred)
    dist = torch.sqrt(quad.clamp_min(0))
    inverted: list[float | None] = [None] * len(feats)
    if "polarity_w" in stats:
        w, b = stats["polarity_w"].double(), stats["polarity_b"].double()
        inverted = torch.sigmoid(feats @ w + b).tolist()
    threshold = float(stats["threshold"])
    return [FeatureCheck(float(d), threshold, p) for d, p in zip(dist, inverted, strict=True)]
