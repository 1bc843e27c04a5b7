"""Prompt parsing, singular forms, class variants and the hand-written descriptions."""

import json
import re

import pytest

from tina import prompts
from tina.errors import TinaError
from tina.prompts import (
    NUM_DESCRIPTIONS,
    NUM_VARIANTS,
    TEMPLATES,
    class_variants,
    describe,
    normalize_class,
    parse_prompt,
    singularize,
)

PARSES = [
    ("classify sneakers vs sandals", ["sneaker", "sandal"]),
    ("sneakers vs. sandals", ["sneaker", "sandal"]),
    ("Sneakers VS Sandals!", ["sneaker", "sandal"]),
    ("cats versus dogs", ["cat", "dog"]),
    ("cats, dogs and birds", ["cat", "dog", "bird"]),
    ("cats, dogs, or birds", ["cat", "dog", "bird"]),
    ("cats or dogs", ["cat", "dog"]),
    ("tell cats from dogs", ["cat", "dog"]),
    ("tell sandals from sneakers and boots", ["sandal", "sneaker", "boot"]),
    ("tell apart glasses and scissors", ["glasses", "scissors"]),
    ("tell coats and dresses apart", ["coat", "dress"]),
    ("is it an apple or a pear?", ["apple", "pear"]),
    ("Is this a bus or a truck?", ["bus", "truck"]),
    ("shirt/coat/bag", ["shirt", "coat", "bag"]),
    ("distinguish trousers, dresses and boots", ["trouser", "dress", "boot"]),
    ("distinguish between horses and zebras", ["horse", "zebra"]),
    ("classify images of cats vs dogs", ["cat", "dog"]),
    ("please classify the ankle boots and the sandals", ["ankle boot", "sandal"]),
    ("t-shirts vs ankle boots", ["t-shirt", "ankle boot"]),
    ("knives vs forks", ["knife", "fork"]),
    ("cookies, berries, buses, boxes, watches", ["cookie", "berry", "bus", "box", "watch"]),
    # descriptions survive whole; only the leading article goes
    ("classify a shoe held on by straps vs a warm winter coat", ["shoe held on by straps", "warm winter coat"]),
    ("shoes held on by straps or boots", ["shoe held on by straps", "boot"]),
    # with a strong separator, "/" and "and" stay inside a class
    ("T-shirt/top vs Trouser vs Pullover", ["t-shirt/top", "trouser", "pullover"]),
    ("salt and pepper vs sugar", ["salt and pepper", "sugar"]),
    ("labels vs tags", ["label", "tag"]),  # a filler word followed by a separator is a class
    ("'sneakers' vs \"sandals\"", ["sneaker", "sandal"]),
    ("cats vs dogs vs", ["cat", "dog"]),  # a dangling separator is dropped
]


@pytest.mark.parametrize("text,expected", PARSES)
def test_parse_prompt(text, expected):
    assert parse_prompt(text) == expected


ERRORS = [
    ("", "empty"),
    ("   \n ", "empty"),
    ("classify", "no class names"),
    ("sneakers", "only one class"),
    ("classify sneakers vs", "only one class ('sneaker')"),
    ("sneakers vs sandals vs Sneaker", "'sneaker' appears twice"),
    ("the cat or a cats", "'cat' appears twice"),
    ("cats vs " + "dogs " * 300, "characters long"),
]


@pytest.mark.parametrize("text,message", ERRORS)
def test_parse_prompt_errors(text, message):
    with pytest.raises(TinaError, match=re.escape(message)):
        parse_prompt(text)


@pytest.mark.parametrize(
    "plural,singular",
    [
        ("trousers", "trouser"), ("sandals", "sandal"), ("dresses", "dress"), ("boots", "boot"),
        ("t-shirts", "t-shirt"), ("knives", "knife"), ("glasses", "glasses"), ("dress", "dress"),
        ("cactus", "cactus"), ("berries", "berry"), ("cookies", "cookie"), ("boxes", "box"),
        ("watches", "watch"), ("brushes", "brush"), ("shoes", "shoe"), ("potatoes", "potato"),
        ("horses", "horse"), ("gloves", "glove"), ("leaves", "leaf"), ("mice", "mouse"),
        ("children", "child"), ("sheep", "sheep"), ("buses", "bus"), ("bus", "bus"), ("lens", "lens"),
        ("jeans", "jeans"), ("iris", "iris"), ("skis", "ski"), ("axes", "axe"), ("sneaker", "sneaker"),
    ],
)
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_normalize_class():
    assert normalize_class("The Ankle Boots") == "ankle boot"
    assert normalize_class("a shoe held on by straps") == "shoe held on by straps"
    assert normalize_class("T-shirt/top") == "t-shirt/top"
    assert normalize_class("  an   Apple. ") == "apple"


def test_class_variants_length_order_and_determinism():
    for name in ["sandal", "ankle boot", "T-shirt/top", "zebra crossing", "shoe held on by straps", "qwzxv"]:
        v = class_variants(name)
        assert len(v) == NUM_VARIANTS == 1 + len(TEMPLATES) + NUM_DESCRIPTIONS
        assert v[0] == name  # the plain name first
        assert all(isinstance(s, str) and s.strip() for s in v)
        assert v == class_variants(name)  # deterministic
    assert class_variants("apple")[1] == "a photo of an apple"  # article follows the sound
    assert class_variants("jeans")[1] == "a photo of a pair of jeans"


def test_class_variants_rejects_empty_name():
    with pytest.raises(TinaError):
        class_variants("  ")


def test_describe_sources():
    # hand-written
    assert describe("sandal") == ["an open shoe held on by straps", "summer footwear that leaves the toes bare"]
    assert describe("Sandals") == describe("sandal")  # normalised lookup
    assert describe("T-shirt/top") == describe("t-shirt")  # Fashion-MNIST's name maps onto the entry
    # unknown word → template text naming the class
    assert describe("qwzxv") == ["something that looks like a qwzxv", "a simple illustration showing a qwzxv"]
    assert all(len(describe(n)) == NUM_DESCRIPTIONS for n in ["cat", "qwzxv", "zebra crossing"])


@pytest.mark.skipif(prompts.wordnet_dir() is None, reason="WordNet (Debian wordnet-base) not installed")
def test_describe_falls_back_to_wordnet():
    assert "descriptions" not in describe("zebra crossing")[0]
    definition, kind = describe("zebra crossing")
    assert "pedestrian" in definition and kind.startswith("a kind of crossing")
    definition, kind = describe("saxophone")  # not in descriptions.json
    assert "saxophone" not in definition and kind.startswith("a kind of")


def test_descriptions_json_is_well_formed():
    data = json.loads(prompts.DESCRIPTIONS_PATH.read_text(encoding="utf-8"))
    table, aliases = data["descriptions"], data["aliases"]
    fashion = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    assert set(fashion) <= set(table) and len(table) >= 60
    for name, texts in table.items():
        assert normalize_class(name) == name, f"key {name!r} is not normalised"
        assert len(texts) == NUM_DESCRIPTIONS and all(t.strip() for t in texts), name
        head = name.split()[-1]
        for t in texts:
            words = set(re.findall(r"[\w'-]+", t.lower()))
            # a paraphrase, not a spelling lesson: neither the name nor its head noun appears
            assert not re.search(rf"\b{re.escape(name)}s?\b", t.lower()), (name, t)
            assert not {head, head + "s", head + "es"} & words, (name, t)
    for alias, target in aliases.items():
        assert target in table, f"alias {alias!r} points at missing {target!r}"
        assert normalize_class(alias) == alias
