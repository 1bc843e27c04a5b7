"""Prompt forms: the per-class conditioning (k, E) of every form for one task (names, templates, held-out
wordings, and the wrong texts that must hurt)."""

from __future__ import annotations

import random
import string

import torch
import torch.nn.functional as F


# Never used to build a zoo (tina/prompts.py TEMPLATES are), so the generator has not seen them.
HELD_OUT_TEMPLATES = (
    "a close-up photograph of {a}",
    "{a} on a plain background",
    "this is {a}",
    "a low-resolution picture showing {a}",
)
# Hand-written paraphrases in words the zoo's descriptions do not use.
HAND_PARAPHRASES = {
    "t-shirt": "a plain tee you would wear to the gym",
    "trouser": "a pair of slacks or chinos",
    "pullover": "a cosy sweater to put on when it gets chilly",
    "dress": "a frock to wear to a summer party",
    "coat": "a winter overcoat",
    "sandal": "a flip-flop style shoe with open toes",
    "shirt": "a button-up blouse with a collar",
    "sneaker": "a trainer for jogging",
    "bag": "a tote or a purse",
    "ankle boot": "a short boot such as a Chelsea boot",
    "apple": "a crunchy red or green fruit",
    "bicycle": "a two-wheeled bike you pedal",
    "cat": "a small furry pet that purrs",
    "dog": "a loyal pet that barks",
    "airplane": "a passenger jet in the sky",
    "automobile": "a family car",
    "bird": "a small feathered animal with wings",
    "deer": "a wild animal with antlers",
    "frog": "a green amphibian that hops",
    "horse": "a large animal people ride",
    "ship": "a big boat on the sea",
    "truck": "a heavy lorry for freight",
}
UNRELATED_WORDS = (
    "algebra", "democracy", "photosynthesis", "parliament", "thunderstorm", "mortgage", "grammar", "volcano",
    "electricity", "jurisdiction", "hypothesis", "inflation", "saxophone", "glacier", "bureaucracy", "astronomy",
    "vaccination", "philosophy", "earthquake", "legislation", "symphony", "erosion", "cryptography", "harvest",
)


def unrelated_words(rng, k: int) -> list[str]:
    """k distinct words unrelated to any dataset; with more classes than words (clip art: k up to 32),
    distinct two-word phrases."""
    pool = UNRELATED_WORDS if k <= len(UNRELATED_WORDS) else [f"{a} {b}" for a in UNRELATED_WORDS for b in UNRELATED_WORDS if a != b]
    return rng.sample(pool, k)

def random_string(rng: random.Random) -> str:
    """Two pronounceable-free random 'words' of letters, e.g. 'qzvbt lorpxe'."""
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8))) for _ in range(2))


def mismatched_ids(class_ids: list[int], all_tasks: list[list[int]], num_classes: int, rng: random.Random) -> list[int]:
    """Another zoo task's classes with the same k and no class in the same position (disjoint if possible);
    else k random classes with no positional match."""
    k = len(class_ids)
    same_k = [t for t in all_tasks if len(t) == k and all(a != b for a, b in zip(t, class_ids))]
    disjoint = [t for t in same_k if not set(t) & set(class_ids)]
    pick = disjoint or same_k
    if pick:
        return list(rng.choice(pick))
    others = list(range(num_classes))
    for _ in range(100):
        rng.shuffle(others)
        if all(a != b for a, b in zip(others[:k], class_ids)):
            return others[:k]
    return others[:k]


def _rng(*parts) -> random.Random:
    """A generator seeded by the parts' repr (stable across processes, unlike hash() of strings)."""
    return random.Random(repr(parts))


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class Conditions:
    """Builds the per-class conditioning (k, E) of every prompt form for one task."""

    def __init__(self, man: dict, vocab_names: torch.Tensor, encoder, seed: int, notes: list[str]):
        from tina.prompts import NUM_VARIANTS, TEMPLATES, fill_template

        self.man, self.vocab_names, self.encoder, self.seed, self.notes = man, vocab_names, encoder, seed, notes
        self.n_templates, self.num_variants = len(TEMPLATES), int(man.get("num_variants", NUM_VARIANTS))
        self.stored_ok = self.num_variants == NUM_VARIANTS
        self.fill = fill_template
        self.all_tasks = [list(v) for v in man.get("tasks", {}).values()]
        self._cache: dict[str, torch.Tensor] = {}

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(n, E) embeddings; one encoder call for all texts not seen before."""
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            for t, e in zip(new, self.encoder.encode(new)):
                self._cache[t] = e.float()
        return torch.stack([self._cache[t] for t in texts])

    def texts(self, form: str, m: dict, split_i: int, i: int) -> list[str] | None:
        """The strings a text-encoder form feeds for task i (None for forms built from stored embeddings)."""
        rng = _rng(self.seed, split_i, i, form)
        classes = m["classes"]
        if form == "heldout_template":
            return [self.fill(HELD_OUT_TEMPLATES[(i + j) % len(HELD_OUT_TEMPLATES)], c) for j, c in enumerate(classes)]
        if form == "paraphrase":
            return [HAND_PARAPHRASES.get(c) or self.fill(HELD_OUT_TEMPLATES[(i + j) % len(HELD_OUT_TEMPLATES)], c)
                    for j, c in enumerate(classes)]
        if form == "random_text":
            return [random_string(rng) for _ in classes]
        if form == "unrelated_words":
            return unrelated_words(rng, len(classes))
        return None

    def cond(self, form: str, m: dict, split_i: int, i: int) -> tuple[torch.Tensor, list[int] | None]:
        """(k, E) conditioning and, for `shuffled`, the permutation (generated row j is class perm[j])."""
        emb, k = m["emb"], len(m["classes"])
        if form == "names":
            return unit(emb[:, 0]), None
        if form == "template":
            return unit(torch.stack([emb[j, 1 + (i + j) % self.n_templates] for j in range(k)])), None
        if form == "description":
            n_desc = self.num_variants - 1 - self.n_templates
            return unit(torch.stack([emb[j, 1 + self.n_templates + (i + j) % n_desc] for j in range(k)])), None
        if form == "shuffled":
            rng = _rng(self.seed, split_i, i, form)
            perm = list(range(k))
            while k > 1 and perm == list(range(k)):
                rng.shuffle(perm)
            return unit(emb[perm, 0]), perm
        if form == "mismatched":
            rng = _rng(self.seed, split_i, i, form)
            ids = mismatched_ids(list(m["class_ids"]), self.all_tasks, self.vocab_names.shape[0], rng)
            return unit(self.vocab_names[ids]), None
        texts = self.texts(form, m, split_i, i)
        if self.encoder is None:  # random_text / unrelated_words without an encoder: random unit vectors
            g = torch.Generator().manual_seed(_rng(self.seed, split_i, i, form).getrandbits(63))
            return unit(torch.randn(k, emb.shape[-1], generator=g)), None
        return unit(self.encode(texts)), None


