"""What a generator knows about a prompt before generating: matches, expected accuracy, warnings.

Every prompt class is matched to the vocabulary class it is closest to, by the similarity soft
selection uses (best cosine to any of a class's prompt variants, tina/anchor.py). From the matches
and the checkpoint's calibration file (quality.json, written by `python -m evaluation.calibrate`) come

  * the expected test accuracy with an 80% range: a logistic model in a few features known without
    test images (k, similarities, margins, collisions, and a prior from the pairwise recall of the
    checkpoint's own two-class models, which turns a collision into a coin flip); the range is the
    expectation plus residual percentiles / sqrt(k), per bin of the expected share of misresolved
    classes (evaluation/calibration_fit.py), and may reach below chance;
  * warnings, one line each: a class far from the vocabulary (under the calibrated similarity
    threshold), two classes resolving to the same known class, a class broader or narrower than
    the known class it resolves to (WordNet, else shared head nouns), an expectation near chance.

    quality.json   {"format": "tina-quality/1", "vocab": [...], "layout_fingerprint": ...,
                    "pair_recall": V x V (row c, column d: recall of c in the 2-class model [c, d]),
                    "predictor": {"features", "mean", "scale", "weights", "bias", "bin_feature",
                                  "bins": [{"upto", "low", "high"}] (residuals of z times sqrt(k)), "resolution"},
                    "thresholds": {"unknown_similarity", "near_chance"}, "check": {...}, "fit": {...}}
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tina.anchor import variant_similarity
from tina.errors import TinaError

log = logging.getLogger(__name__)
QUALITY_FORMAT = "tina-quality/2"  # /2: ranges in z / sqrt(k), binned by the unresolved share
QUALITY_FILE = "quality.json"
DEFAULT_UNKNOWN_SIMILARITY = 0.5  # without a calibration: the pre-calibration vocabulary warning's cut
NEAR_CHANCE = 0.3  # without a calibration: warn when the expected accuracy covers less than this share of the way from chance to 1
NEAR_CHANCE_Z = 0.25  # a model is near chance when its measured accuracy covers less than this share of that way
FEATURES = ("logit_structured", "log_k", "exact_frac")  # chosen by 5-fold cross-validation on the fit rows
BIN_FEATURE = "unresolved"  # range widths differ by the expected share of misresolved classes
EPS = 1e-3


@dataclass
class ClassMatch:
    """One prompt class and the vocabulary class it resolves to."""

    name: str
    known: str  # nearest vocabulary class
    index: int  # its vocabulary index
    similarity: float  # best cosine to any of its prompt variants
    runner_up: str  # second nearest vocabulary class
    margin: float  # similarity - the runner-up's
    from_images: bool = False  # the condition came from image prompts

    @property
    def exact(self) -> bool:
        return self.name.lower() == self.known.lower()


def match_classes(classes: list[str], cond: torch.Tensor, vocab: list[str], keys: torch.Tensor,
                  image_classes: set[str] = frozenset()) -> list[ClassMatch]:
    """Matches of k classes (conditions cond (k, E)) against a vocabulary with keys (V, NV, E) or (V, E)."""
    sims = variant_similarity(cond, keys)  # (k, V)
    top = sims.topk(min(2, sims.shape[1]), dim=-1)
    out = []
    for i, c in enumerate(classes):
        v, j = top.values[i].tolist(), top.indices[i].tolist()
        second = v[1] if len(v) > 1 else 0.0
        out.append(ClassMatch(c, vocab[j[0]], j[0], v[0], vocab[j[-1]], v[0] - second, c in image_classes))
    return out


def load_quality(path: Path, vocab: list[str], fingerprint: str) -> dict | None:
    """The calibration file of a generator folder (None when it has none), checked against its vocabulary."""
    f = Path(path) / QUALITY_FILE
    if not f.is_file():
        return None
    try:
        q = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TinaError(f"{f} is unreadable or corrupt: {e}") from None
    if isinstance(q, dict) and str(q.get("format", "")).startswith("tina-quality/") and q["format"] != QUALITY_FORMAT:
        # an older calibration: the generator still works, without an expected accuracy until it is refitted
        log.warning("%s has format %r, this Tina reads %r: no expected accuracy until you rerun "
                    "python -m evaluation.calibrate %s --zoo-config ZOO.yaml --refit", f, q["format"], QUALITY_FORMAT, path)
        return None
    if not isinstance(q, dict) or q.get("format") != QUALITY_FORMAT:
        raise TinaError(f"{f} is not a Tina calibration file (format {QUALITY_FORMAT!r})")
    if q.get("vocab") != list(vocab) or q.get("layout_fingerprint") != fingerprint:
        raise TinaError(f"{f} was calibrated for another vocabulary or layout; rerun python -m evaluation.calibrate {path}")
    V = len(vocab)
    pair = q.get("pair_recall")
    if not isinstance(pair, list) or len(pair) != V or any(len(r) != V for r in pair):
        raise TinaError(f"{f}: pair_recall must be a {V} x {V} table")
    return q


def unknown_threshold(quality: dict | None) -> float:
    return float((quality or {}).get("thresholds", {}).get("unknown_similarity", DEFAULT_UNKNOWN_SIMILARITY))


# ---- features and the predictor ------------------------------------------------------------------


def _logit(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


def resolution_probability(m: ClassMatch, resolution: dict | None) -> float:
    """P(a class resolves to its true known class): 1 for an exact name, else a logistic in
    (similarity, margin) fitted by the calibration (1 without one)."""
    if m.exact or not resolution:
        return 1.0
    w, b = resolution["weights"], resolution["bias"]
    return 1 / (1 + math.exp(-(b + w[0] * m.similarity + w[1] * m.margin)))


def task_features(matches: list[ClassMatch], pair_recall: list[list[float | None]] | None,
                  resolution: dict | None = None) -> dict[str, float]:
    """The predictor's inputs for one task.

    recall_i = product of the pairwise recalls of class i's match against the other classes' matches
    (0.5 where two classes share a match: a coin flip); p_i = resolution_probability; structured =
    mean_i (p_i recall_i + (1 - p_i) / k): a misresolved class scores chance. With exact names,
    structured alone predicts Fashion-MNIST's held-out accuracies within 0.01 (docs).
    """
    k = len(matches)
    ids = [m.index for m in matches]
    recall = [1.0] * k
    if pair_recall is not None:
        measured = [v for row in pair_recall for v in row if v is not None]
        fill = sum(measured) / len(measured) if measured else 0.9
        for i, a in enumerate(ids):
            for j, b in enumerate(ids):
                if i != j:
                    recall[i] *= 0.5 if a == b else (pair_recall[a][b] if pair_recall[a][b] is not None else fill)
    p = [resolution_probability(m, resolution) for m in matches]
    structured = sum(pi * ri + (1 - pi) / k for pi, ri in zip(p, recall)) / k
    sims, margins = [m.similarity for m in matches], [m.margin for m in matches]
    return {
        "structured": structured,
        "logit_structured": _logit((structured - 1 / k) / (1 - 1 / k)),
        "log_k": math.log(k - 1),
        "exact_frac": sum(m.exact for m in matches) / k,
        "resolution_uncertainty": sum(pi * (1 - pi) for pi in p) / k,
        "unresolved": sum(1 - pi for pi in p) / k,
        "min_sim": min(sims),
        "min_margin": min(margins),
        "collision_frac": (k - len(set(ids))) / k,
    }


def predictor_eta(predictor: dict, feats: dict[str, float]) -> float:
    """Linear score in logit space of z = (accuracy - chance) / (1 - chance)."""
    x = [(feats[f] - m) / s for f, m, s in zip(predictor["features"], predictor["mean"], predictor["scale"])]
    return predictor["bias"] + sum(w * v for w, v in zip(predictor["weights"], x))


def predict(predictor: dict, feats: dict[str, float], k: int) -> tuple[float, float, float]:
    """(expected accuracy, low, high): the 80% range is z_hat + (residual percentiles of the task's bin
    of predictor["bin_feature"]) / sqrt(k), in accuracy and clipped to [0, 1] (it may reach below chance)."""
    z_hat = 1 / (1 + math.exp(-predictor_eta(predictor, feats)))
    chance = 1.0 / k
    bins, key = predictor["bins"], feats[predictor["bin_feature"]]
    b = next((b for b in bins if key <= b["upto"]), bins[-1])
    to_acc = lambda z: min(max(chance + (1 - chance) * z, 0.0), 1.0)  # noqa: E731
    return to_acc(z_hat), to_acc(z_hat + b["low"] / math.sqrt(k)), to_acc(z_hat + b["high"] / math.sqrt(k))


# ---- broader / narrower terms ---------------------------------------------------------------------


def relation(prompt_class: str, known: str) -> str | None:
    """"broader" when the prompt names a wider category than the known class ("boot" vs "ankle boot",
    "shoe" vs "sneaker"), "narrower" for a kind of it ("jacket" vs "coat"), else None."""
    from tina.prompts import wordnet_relations

    p, k = prompt_class.lower(), known.lower()
    if p == k:
        return None
    if len(k.split()) > 1 and k.split()[-1] == p:
        return "broader"
    if len(p.split()) > 1 and p.split()[-1] == k:
        return "narrower"
    rel_p, rel_k = wordnet_relations(p), wordnet_relations(k) or wordnet_relations(k.split()[-1])
    if rel_p and k in rel_p["broader"]:
        return "narrower"
    if rel_k and (p in rel_k["broader"] or p == k.split()[-1]):
        return "broader"
    return None


# ---- the assessment -------------------------------------------------------------------------------


@dataclass
class Assessment:
    """Everything said about a task before generating it."""

    matches: list[ClassMatch]
    threshold: float  # similarity under which a class counts as unknown
    expected: float | None = None
    low: float | None = None
    high: float | None = None
    basis: str = ""
    check: str = ""  # short form of the basis: how the calibration did on held-out class sets
    warnings: list[str] = field(default_factory=list)

    @property
    def unknown(self) -> list[ClassMatch]:
        """Classes named in words too far from every known class (image-prompted classes are exempt)."""
        return [m for m in self.matches if not m.from_images and m.similarity < self.threshold]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.matches)

    def summary(self) -> str:
        """One line: 'expected accuracy 0.93 (80% range 0.89-0.96; basis ...)'."""
        if self.expected is None:
            return f"expected accuracy: unknown ({self.basis})"
        return (f"expected accuracy {self.expected:.2f} (80% range {self.low:.2f}-{self.high:.2f}; chance {self.chance:.2f}; "
                f"{self.check})")

    def resolved(self) -> str:
        """'boot -> ankle boot (0.62), jacket -> coat (0.78)' for the classes not named exactly."""
        return ", ".join(f"{m.name} -> {m.known} ({m.similarity:.2f})" for m in self.matches if not m.exact)

    def info(self) -> dict:
        """The config.json entries."""
        return {
            "expected_accuracy": {"value": self.expected, "low": self.low, "high": self.high, "range": "80%",
                                  "chance": self.chance, "basis": self.basis},
            "known_classes": [{"class": m.name, "known": m.known, "similarity": round(m.similarity, 4),
                               "margin": round(m.margin, 4), "from_images": m.from_images} for m in self.matches],
            "unknown_classes": [m.name for m in self.unknown],
        }


def assess(classes: list[str], cond: torch.Tensor, vocab: list[str], keys: torch.Tensor, quality: dict | None,
           image_classes: set[str] = frozenset()) -> Assessment:
    """Matches, expected accuracy and warnings for k classes with conditions cond (k, E)."""
    matches = match_classes(classes, cond, vocab, keys, set(image_classes))
    a = Assessment(matches, unknown_threshold(quality))
    k = len(matches)
    for m in a.unknown:
        near = _nearest(cond[classes.index(m.name)], vocab, keys)
        a.warnings.append(f"class {m.name!r} is far from this checkpoint's vocabulary (similarity {m.similarity:.2f} < "
                          f"{a.threshold:.2f}); nearest: {near}")
    by_known: dict[str, list[ClassMatch]] = {}
    for m in matches:
        by_known.setdefault(m.known, []).append(m)
    for known, group in by_known.items():
        if len(group) > 1 and not all(m in a.unknown for m in group):  # all unknown: said above
            names = " and ".join(f"{m.name!r} ({m.similarity:.2f})" for m in group)
            a.warnings.append(f"{names} both resolve to the known class {known!r}: the model cannot tell them apart")
    for m in matches:
        if m.from_images or m in a.unknown:
            continue
        rel = relation(m.name, m.known)
        if rel == "broader":
            kinds = [v for v in vocab if relation(m.name, v) == "broader"]
            a.warnings.append(f"{m.name!r} is broader than the known class {m.known!r} it resolves to ({m.similarity:.2f}); "
                              f"known kinds of {m.name}: {', '.join(kinds)}; other kinds may be misclassified")
        elif rel == "narrower":
            a.warnings.append(f"{m.name!r} is narrower than the known class {m.known!r} it resolves to ({m.similarity:.2f}); "
                              f"the model recognises {m.known} in general, not {m.name} specifically")
    if quality is None or "predictor" not in quality:
        a.basis = "this checkpoint has no calibration (quality.json); run python -m evaluation.calibrate CHECKPOINT"
        return a
    feats = task_features(matches, quality.get("pair_recall"), quality["predictor"].get("resolution"))
    a.expected, a.low, a.high = predict(quality["predictor"], feats, k)
    chk = quality.get("check", {})
    a.check = f"calibrated on held-out class sets: MAE {chk.get('mae', float('nan')):.3f}, range coverage {chk.get('coverage', float('nan')):.0%}"
    a.basis = (f"calibrated on {quality.get('fit', {}).get('rows', '?')} generated models with real test images "
               f"(k, similarity to the vocabulary, collisions, pairwise recall of known classes); on held-out class sets "
               f"MAE {chk.get('mae', float('nan')):.3f}, range coverage {chk.get('coverage', float('nan')):.0%}")
    near = float(quality.get("thresholds", {}).get("near_chance", NEAR_CHANCE))
    if (a.expected - a.chance) < near * (1 - a.chance):
        a.warnings.append(f"expected accuracy {a.expected:.2f} is near chance ({a.chance:.2f} for {k} classes)")
    return a


def _nearest(cond_row: torch.Tensor, vocab: list[str], keys: torch.Tensor, n: int = 3) -> str:
    top = variant_similarity(cond_row[None], keys)[0].topk(min(n, len(vocab)))
    return ", ".join(f"{vocab[j]} ({v:.2f})" for v, j in zip(top.values.tolist(), top.indices.tolist()))
