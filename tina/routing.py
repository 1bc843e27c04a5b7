"""Which shipped generator knows a prompt's classes: checkpoint cards and routing.

A `Card` is what routing and `tina info` need from a generator folder, read without building its
DiT: dataset, image kind, vocabulary, the anchor's prompt-variant keys (V, NV, E) (else the plain
vocabulary embeddings) and the calibration file. `route(classes)` matches the classes against every
card with the similarity soft selection uses (tina/anchor.py) and picks the card that knows the
most classes (similarity at or above its calibrated unknown threshold), ties broken by the mean
similarity. `Tina.from_pretrained("auto", prompt=...)` and `tina generate` without --checkpoint use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tina.errors import TinaError
from tina.expected import ClassMatch, load_quality, match_classes, unknown_threshold
from tina.registry import checkpoint_name, resolve_checkpoint, shipped
from tina.targets import ImageSpec


@dataclass
class Card:
    """A generator folder's identity and vocabulary (no generator weights loaded)."""

    name: str
    path: Path
    dataset: str
    image: ImageSpec
    text_encoder: str
    k_max: int
    vocab: list[str]
    vocab_emb: torch.Tensor  # (V, E) plain-name embeddings
    keys: torch.Tensor  # (V, NV, E) anchor prompt-variant keys, else (V, 1, E) names
    quality: dict | None

    @property
    def threshold(self) -> float:
        return unknown_threshold(self.quality)

    def describe(self) -> dict:
        """What `tina info` lists for a checkpoint."""
        kind = "grey" if self.image.channels == 1 else "RGB"
        q = self.quality or {}
        return {"name": self.name, "path": str(self.path), "dataset": self.dataset,
                "domain": f"{self.image.size}x{self.image.size} {kind} images of {self.dataset}",
                "k_max": self.k_max, "vocabulary": self.vocab,
                "quality": q.get("summary", "not calibrated (python -m evaluation.calibrate CHECKPOINT)"),
                "unknown_similarity": self.threshold}


def read_card(path: str | Path, name: str | None = None) -> Card:
    """A card from a generator folder: bundle.json, vocab.json, two tensors of weights.safetensors, quality.json."""
    from safetensors import safe_open

    from tina.bundle import read_meta

    path = resolve_checkpoint(path)
    meta, image, vocab = read_meta(path)
    try:
        with safe_open(str(path / "weights.safetensors"), "pt") as f:
            names = set(f.keys())
            vocab_emb = f.get_tensor("vocab.names").float()
            keys = f.get_tensor("anchor.keys").float() if "anchor.keys" in names else vocab_emb[:, None]
    except Exception as e:  # noqa: BLE001 - unreadable JSON, a corrupt or incomplete safetensors file
        raise TinaError(f"checkpoint {path} is unreadable or incomplete: {e}") from None
    return Card(name or checkpoint_name(path), path, meta["dataset"], image,
                meta["text_encoder"], int(meta["k_max"]), vocab, vocab_emb, keys,
                load_quality(path, vocab, meta["layout_fingerprint"]))


def shipped_cards() -> list[Card]:
    return [read_card(p, name) for name, p in shipped().items()]


def embed_for(cards: list[Card], classes: list[str]) -> dict[str, torch.Tensor]:
    """(k, E) class embeddings per text encoder: names some card's vocabulary holds use its stored
    embedding (no encoder load for in-vocabulary prompts), the rest are encoded once."""
    from tina.text import get_text_encoder

    out = {}
    for enc in sorted({c.text_encoder for c in cards}):
        stored = {}
        for c in cards:
            if c.text_encoder == enc:
                stored |= {n.lower(): c.vocab_emb[i] for i, n in enumerate(c.vocab)}
        missing = [x for x in classes if x.lower() not in stored]
        if missing:
            stored |= {x.lower(): e.float() for x, e in zip(missing, get_text_encoder(enc).encode(missing))}
        out[enc] = torch.stack([stored[x.lower()] for x in classes])
    return out


@dataclass
class Route:
    """The routing decision and what every card made of the classes."""

    card: Card
    reason: str
    matches: dict[str, list[ClassMatch]] = field(default_factory=dict)  # card name -> per-class matches
    cards: list[Card] = field(default_factory=list)

    @property
    def checkpoint(self) -> str:
        return self.card.name

    def info(self) -> dict:
        """The config.json entry."""
        return {"checkpoint": self.card.name, "reason": self.reason,
                "candidates": {c.name: _score(self.matches[c.name], c.threshold) for c in self.cards}}

    def refusal(self, unknown: list[str]) -> str:
        """The one-line exit-2 message when the chosen checkpoint does not know the `unknown` classes."""
        per = "; ".join(f"{c.name}: " + ", ".join(f"{m.name} -> {m.known} ({m.similarity:.2f})" for m in self.matches[c.name]
                                                   if m.name in unknown)
                        for c in self.cards)
        better = [c.name for c in self.cards if c.name != self.card.name
                  and all(m.similarity >= c.threshold for m in self.matches[c.name] if m.name in unknown)]
        head = (f"{self.card.name} does not know {', '.join(repr(u) for u in unknown)}, but {better[0]} does: use --checkpoint {better[0]}"
                if better else f"no checkpoint knows {', '.join(repr(u) for u in unknown)} well enough")
        return (f"{head} (similarity under {self.card.threshold:.2f}, where accuracy falls toward chance); nearest known "
                f"classes: {per}. Use classes a checkpoint knows (tina info), add example images (--image CLASS=PATH), "
                f"or pass --allow-unknown to generate anyway")


def _score(matches: list[ClassMatch], threshold: float) -> dict:
    sims = [m.similarity for m in matches]
    return {"known": sum(s >= threshold for s in sims), "of": len(sims), "mean_similarity": round(sum(sims) / len(sims), 4)}


def route(classes: list[str], checkpoint: str | Path | None = None) -> Route:
    """Pick a generator for `classes`: `checkpoint` when given (a name or folder), else the shipped
    card that knows the most classes, ties broken by mean similarity. Every shipped card is scored
    either way, so a refusal can say which checkpoint comes closest."""
    from tina.registry import AUTO

    auto = checkpoint in (None, AUTO)
    cards = shipped_cards()
    chosen = None if auto else read_card(checkpoint)
    if chosen is not None and all(c.path.resolve() != chosen.path.resolve() for c in cards):
        cards = [chosen, *cards]
    if not cards:
        raise TinaError("no generator checkpoint is shipped in tina/checkpoints; pass --checkpoint FOLDER")
    emb = embed_for(cards, classes)
    matches = {c.name: match_classes(classes, emb[c.text_encoder], c.vocab, c.keys) for c in cards}
    scores = {c.name: _score(matches[c.name], c.threshold) for c in cards}
    key = lambda c: (scores[c.name]["known"], scores[c.name]["mean_similarity"])  # noqa: E731
    if chosen is None:
        chosen = max(cards, key=key)
    s = scores[chosen.name]
    others = ", ".join(f"{c.name} {scores[c.name]['known']}/{len(classes)}, {scores[c.name]['mean_similarity']:.2f}"
                       for c in cards if c.name != chosen.name)
    how = "routed" if auto else "asked for"
    reason = (f"{how} {chosen.name}: knows {s['known']}/{len(classes)} classes, mean similarity {s['mean_similarity']:.2f}"
              + (f" (others: {others})" if others else ""))
    return Route(chosen, reason, matches, cards)


def prompt_classes(prompt: str | None = None, classes: list[str] | None = None, image_names: list[str] | None = None) -> list[str]:
    """The class names a request names, as Tina writes them (for routing before a generator is loaded)."""
    from tina.prompts import normalize_class, parse_prompt

    if classes:
        return [normalize_class(c) for c in classes]
    if prompt is not None:
        return parse_prompt(prompt)
    if image_names:
        return [normalize_class(c) for c in image_names]
    raise TinaError("give a prompt, --classes or image prompts")
