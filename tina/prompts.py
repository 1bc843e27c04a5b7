"""Prompts → class names → text variants.

`parse_prompt("classify sneakers vs sandals") == ["sneaker", "sandal"]`: the task's class names, in the
order written, normalised (lower case, no leading article or stray punctuation, head noun singular).

`class_variants("sandal")` is what the text encoder sees for one class: exactly NUM_VARIANTS strings,
the plain name first, then the TEMPLATES, then NUM_DESCRIPTIONS natural-language descriptions
(`describe`) taken from tina/assets/descriptions.json, else from a WordNet gloss (Debian's
wordnet-base, read directly from its data files), else from fallback templates. The count never
varies, so the variants of k classes stack into (k, NUM_VARIANTS, E).

Everything here is deterministic and rule-based: the same prompt gives the same classes and the same
variants on every machine that has the same descriptions.json and WordNet files.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from tina.errors import TinaError

MAX_PROMPT_CHARS = 1000
TEMPLATES = (  # {a}: the name with its article ("a sandal", "an apple", "a pair of jeans"); {name}: bare
    "a photo of {a}",
    "an image of {a}",
    "a picture of the {name}",
    "a drawing of {a}",
    "{name} clipart",
)
NUM_DESCRIPTIONS = 2
NUM_VARIANTS = 1 + len(TEMPLATES) + NUM_DESCRIPTIONS  # 8: plain name, templates, descriptions
FALLBACK_DESCRIPTIONS = ("something that looks like {a}", "a simple illustration showing {a}")
DESCRIPTIONS_PATH = Path(__file__).parent / "assets" / "descriptions.json"

EXAMPLE = "e.g. 'classify sneakers vs sandals' or 'cats, dogs and birds'"

# ---------------------------------------------------------------------------------------------
# Singular forms. Rules for regular English plurals, with lists for everything the rules get wrong.
# ---------------------------------------------------------------------------------------------

IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
    "teeth": "tooth", "geese": "goose", "mice": "mouse", "lice": "louse", "oxen": "ox", "cacti": "cactus",
    "fungi": "fungus", "octopi": "octopus", "knives": "knife", "wives": "wife", "lives": "life",
    "leaves": "leaf", "loaves": "loaf", "wolves": "wolf", "calves": "calf", "halves": "half",
    "shelves": "shelf", "thieves": "thief", "elves": "elf", "scarves": "scarf", "hooves": "hoof",
    "selves": "self", "sheaves": "sheaf", "dwarves": "dwarf", "wharves": "wharf",
    "potatoes": "potato", "tomatoes": "tomato", "heroes": "hero", "echoes": "echo", "volcanoes": "volcano",
    "mosquitoes": "mosquito", "torpedoes": "torpedo", "dominoes": "domino", "mangoes": "mango",
    "buffaloes": "buffalo", "flamingoes": "flamingo", "tornadoes": "tornado", "avocadoes": "avocado",
    "cargoes": "cargo", "mottoes": "motto", "vetoes": "veto", "embargoes": "embargo",
    "buses": "bus", "busses": "bus", "gases": "gas", "lenses": "lens", "viruses": "virus", "walruses": "walrus",
    "circuses": "circus", "cactuses": "cactus", "octopuses": "octopus", "platypuses": "platypus",
    "hippopotamuses": "hippopotamus", "irises": "iris", "canvases": "canvas", "atlases": "atlas",
    "bonuses": "bonus", "campuses": "campus", "choruses": "chorus", "geniuses": "genius", "quizzes": "quiz",
    "axes": "axe", "menus": "menu", "emus": "emu", "gnus": "gnu", "tutus": "tutu", "gurus": "guru",
    "haikus": "haiku", "criteria": "criterion", "phenomena": "phenomenon", "indices": "index",
    "matrices": "matrix", "vertices": "vertex", "niches": "niche", "caches": "cache",
    "headaches": "headache", "moustaches": "moustache", "mustaches": "mustache", "avalanches": "avalanche",
    "quiches": "quiche", "cliches": "cliche", "psyches": "psyche",
}
# Same in both numbers, plural-only, or singular nouns that end in "s": left as they are.
INVARIANT = {
    "sheep", "fish", "deer", "moose", "salmon", "trout", "shrimp", "aircraft", "spacecraft", "bison",
    "swine", "cattle", "series", "species", "news", "means", "data", "dice", "chess", "physics", "lens",
    "glasses", "sunglasses", "eyeglasses", "scissors", "pants", "jeans", "shorts", "pliers", "tongs",
    "binoculars", "headphones", "earphones", "goggles", "leggings", "pajamas", "pyjamas", "tights",
    "overalls", "trunks", "clothes", "billiards", "darts", "mathematics", "economics",
    "iris", "tennis", "axis", "chassis", "trellis", "pelvis", "analysis", "oasis", "crisis", "basis",
    "thesis", "ibis", "mantis", "hubris", "marquis",
}
# Pair nouns take "a pair of" as their article; mass nouns take none.
PAIR_NOUNS = {
    "glasses", "sunglasses", "eyeglasses", "scissors", "pants", "jeans", "shorts", "pliers", "tongs",
    "binoculars", "headphones", "earphones", "goggles", "leggings", "pajamas", "pyjamas", "tights", "overalls",
}
MASS_NOUNS = {
    "money", "rice", "water", "furniture", "food", "bread", "grass", "snow", "rain", "lightning", "fire",
    "coffee", "tea", "milk", "juice", "wine", "beer", "pasta", "sushi", "cheese", "fog", "smoke", "sand",
    "clothing", "luggage", "jewelry", "jewellery", "popcorn", "spaghetti", "broccoli", "cattle", "clothes",
}
# "cookies" → "cookie", not "cooky".
IE_NOUNS = {
    "cookie", "movie", "zombie", "brownie", "calorie", "smoothie", "hoodie", "selfie", "magpie", "prairie",
    "beanie", "veggie", "collie", "budgie", "pixie", "genie", "rookie", "goalie", "hippie", "birdie",
    "bootie", "sortie", "necktie", "bowtie", "pie", "tie", "lie", "die", "oldie", "newbie", "cutie",
    "auntie", "boogie", "walkie-talkie", "eerie", "lassie", "aussie", "yuppie", "sweetie", "talkie",
}
# Words that end a class's head noun phrase: "shoe held on by straps" singularises "shoe" only.
PHRASE_BREAKS = {
    "of", "on", "by", "with", "without", "for", "in", "at", "from", "to", "into", "onto", "under", "over",
    "near", "behind", "above", "below", "that", "which", "who", "whose", "where", "when", "like",
    "held", "made", "worn", "used", "wearing", "holding", "carrying", "covered", "filled", "shaped",
    "called", "known", "having", "containing", "showing", "sitting", "standing", "flying", "running",
}


def singularize(word: str) -> str:
    """Singular of one lower-case English word; unknown or already-singular words come back unchanged."""
    if "-" in word:  # "t-shirts" → "t-shirt": the last part carries the number
        head, _, last = word.rpartition("-")
        return f"{head}-{singularize(last)}" if last else word
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in INVARIANT or len(word) <= 3 or not word.isalpha() or not word.endswith("s"):
        return word
    if word.endswith(("ss", "us")):
        return word  # dress, glass, cactus, walrus
    if word.endswith("ies"):
        return word[:-1] if word[:-1] in IE_NOUNS else word[:-3] + "y"  # cookies / berries
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]  # dresses, brushes, watches, boxes, buzzes
    return word[:-1]  # sandals, shoes, horses, gloves, skis


def _head_index(words: list[str]) -> int:
    """Index of the head noun: the word before the first phrase break, else the last word."""
    for i, w in enumerate(words[1:], start=1):
        if w in PHRASE_BREAKS:
            return i - 1
    return len(words) - 1


_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_JUNK = re.compile(r"[^\w\s'/&+-]")  # keep letters, digits, apostrophes, hyphens and "/", "&", "+"


def normalize_class(name: str) -> str:
    """One class name as Tina writes it: lower case, single spaces, no leading article, head noun singular.

    "The Ankle Boots" → "ankle boot"; "a shoe held on by straps" → "shoe held on by straps";
    "T-shirt/top" → "t-shirt/top" (each "/" part is singularised).
    """
    s = name.lower().replace("’", "'").replace("‘", "'")
    s = _JUNK.sub(" ", s)
    s = re.sub(r"\s+", " ", s).strip(" '-/&+")
    s = _ARTICLE.sub("", s)
    if "/" in s:
        return "/".join(normalize_class(part) for part in s.split("/") if part.strip())
    words = s.split()
    if not words:
        return ""
    i = _head_index(words)
    words[i] = singularize(words[i])
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Prompt parsing
# ---------------------------------------------------------------------------------------------

# Leading filler, stripped repeatedly: "please classify between", "is it", "tell apart", "images of".
_LEAD = re.compile(
    r"^(?:please|can you|could you|i want to|i need to|help me|make a (?:model|classifier) (?:that|to|for)|"
    r"(?:a |an )?(?:model|classifier) (?:that|to|for)|classify|classifies|distinguish(?:es)?|differentiate[s]?|"
    r"discriminate[s]?|tell[s]?|recogni[sz]e[s]?|identify|identifies|detect[s]?|separate[s]?|"
    r"categori[sz]e[s]?|apart|between|among|amongst|either|images? of|photos? of|pictures? of|"
    r"pics? of|is it|is this|is that|which is it|what is it|is the (?:image|picture|photo)|it|this)\b[\s:,]*"
)
_VERB_WITH_FROM = re.compile(  # verbs that take "x from y"
    r"^(?:please |can you |could you )?(?:tell|distinguish|differentiate|separate|discriminate|know)\b"
)
_STRONG_SEP = re.compile(r"\s+(?:vs\.?|versus)\s+|\s*[;|]\s*")  # classes may still hold "and", "/", "or"
_WEAK_SEP = re.compile(r"\s*(?:,|/|&|\band\b|\bor\b|\bnor\b)\s*")
_COMMA = re.compile(r"\s*,\s*")
_DANGLING = re.compile(r"(?:\s+(?:vs\.?|versus|and|or|nor|from)|\s*[,/&;|])+$")
_STARTS_WITH_SEP = re.compile(r"^(?:vs\b|versus\b|or\b|and\b|nor\b|from\b|[,/&;|])")


def parse_prompt(text: str) -> list[str]:
    """Class names of a prompt, in order; raises TinaError for an empty prompt, one class or duplicates.

    Understands "classify X vs Y", "X vs. Y", "X versus Y", "X, Y and Z", "X, Y, or Z", "X or Y",
    "tell X from Y", "is it an X or a Y?", "X/Y/Z", "distinguish X, Y and Z". When the prompt has a
    "vs"/"versus"/"from"/";" separator only those (and commas) split it, so "t-shirt/top vs trouser"
    keeps "t-shirt/top" whole.
    """
    if not isinstance(text, str) or not text.strip():
        raise TinaError(f"the prompt is empty; name the classes to tell apart, {EXAMPLE}")
    if len(text) > MAX_PROMPT_CHARS:
        raise TinaError(
            f"the prompt is {len(text)} characters long; keep it under {MAX_PROMPT_CHARS} "
            f"(just the class names, {EXAMPLE})"
        )
    s = text.lower().replace("’", "'").replace("‘", "'")
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"[?!.]+$", "", s).strip()  # "is it an x or a y?"
    s = re.sub(r"\s+apart$", "", s)  # "tell x and y apart"
    s = _DANGLING.sub("", s)  # "cats vs dogs vs" (an unfinished prompt) → "cats vs dogs"
    from_ok = bool(_VERB_WITH_FROM.match(s))
    while True:  # peel leading filler words until none is left
        stripped = _LEAD.sub("", s, count=1).strip()
        # ...but a filler word followed by a separator is a class: "labels vs tags", "apart or together"
        if stripped == s or _STARTS_WITH_SEP.match(stripped):
            break
        s = stripped  # may end up empty: "classify" alone names no class

    parts = _STRONG_SEP.split(s)
    if len(parts) >= 2:  # "x vs y": only vs/versus/;/| and commas separate
        pieces = [p for part in parts for p in _COMMA.split(part)]
    elif from_ok and re.search(r"\s+from\s+", s):  # "tell x from y (and z)"
        pieces = [p for part in re.split(r"\s+from\s+", s, maxsplit=1) for p in _WEAK_SEP.split(part)]
    else:
        pieces = _WEAK_SEP.split(s)
    classes = [c for c in (normalize_class(p) for p in pieces) if c]

    if not classes:
        raise TinaError(f"found no class names in the prompt {text.strip()!r}; {EXAMPLE}")
    if len(classes) == 1:
        raise TinaError(
            f"the prompt names only one class ({classes[0]!r}); a classifier needs at least two, {EXAMPLE}"
        )
    seen: set[str] = set()
    for c in classes:
        if c in seen:
            raise TinaError(
                f"the class {c!r} appears twice in the prompt (after lower-casing and singularising); "
                f"name each class once"
            )
        seen.add(c)
    return classes


# ---------------------------------------------------------------------------------------------
# Variants and descriptions
# ---------------------------------------------------------------------------------------------


def with_article(name: str) -> str:
    """"a sandal", "an apple", "an hourglass", "a unicorn", "a pair of jeans", "rice"."""
    last = name.split()[-1] if name.split() else name
    if name in PAIR_NOUNS or last in PAIR_NOUNS:
        return f"a pair of {name}"
    if name in MASS_NOUNS:
        return name
    first = name.lower()
    vowel_sound = first[:1] in "aeiou"
    if first.startswith(("uni", "use", "usu", "uku", "ute", "euro", "eu", "one", "once", "ewe", "ufo")):
        vowel_sound = False
    if first.startswith(("hour", "honest", "honor", "honour", "heir")):
        vowel_sound = True
    return f"{'an' if vowel_sound else 'a'} {name}"


def fill_template(template: str, name: str) -> str:
    return template.format(a=with_article(name), name=name)


@functools.cache
def _descriptions() -> tuple[dict[str, list[str]], dict[str, str]]:
    if not DESCRIPTIONS_PATH.is_file():
        return {}, {}
    data = json.loads(DESCRIPTIONS_PATH.read_text(encoding="utf-8"))
    return data.get("descriptions", {}), data.get("aliases", {})


def wordnet_dir() -> Path | None:
    """WordNet's dict folder: $WNSEARCHDIR, else Debian's /usr/share/wordnet; None when absent."""
    for d in (os.environ.get("WNSEARCHDIR"), "/usr/share/wordnet"):
        if d and (Path(d) / "index.noun").is_file() and (Path(d) / "data.noun").is_file():
            return Path(d)
    return None


@functools.cache
def _wordnet_index(root: str) -> dict[str, int]:
    """lemma → byte offset of its first (most frequent) noun sense in data.noun."""
    index = {}
    with open(Path(root) / "index.noun", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):  # licence header
                continue
            fields = line.split()
            # lemma pos synset_cnt p_cnt [ptr_symbol × p_cnt] sense_cnt tagsense_cnt offset...
            p_cnt = int(fields[3])
            index[fields[0]] = int(fields[6 + p_cnt])
    return index


def _wordnet_record(root: Path, offset: int) -> tuple[list[str], dict[str, list[int]], str]:
    """(lemmas, {pointer symbol: noun synset offsets}, gloss) of the noun synset at `offset`."""
    with open(root / "data.noun", "rb") as f:
        f.seek(offset)
        line = f.readline().decode("utf-8", errors="replace")
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    w_cnt = int(fields[3], 16)
    lemmas = [fields[4 + 2 * i].replace("_", " ").lower() for i in range(w_cnt)]
    lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]  # "sandal(a)" markers
    rest = fields[4 + 2 * w_cnt :]
    pointers: dict[str, list[int]] = {}
    for i in range(int(rest[0])):  # symbol offset pos source/target
        symbol, target, pos = rest[1 + 4 * i : 4 + 4 * i]
        if pos == "n":
            pointers.setdefault(symbol, []).append(int(target))
    return lemmas, pointers, gloss.strip()


def _wordnet_synset(root: Path, offset: int) -> tuple[list[str], list[int], str]:
    """(lemmas, hypernym offsets, gloss) of the noun synset at `offset`."""
    lemmas, pointers, gloss = _wordnet_record(root, offset)
    return lemmas, pointers.get("@", []) + pointers.get("@i", []), gloss


@functools.cache
def wordnet_relations(name: str) -> dict[str, list[str]] | None:
    """WordNet's first noun sense of `name`: its other lemmas ("synonyms"), the first lemma of every
    hypernym up to the root ("broader", nearest first) and of its direct hyponyms ("narrower").
    None when WordNet is not installed or does not know the word."""
    root = wordnet_dir()
    offset = _wordnet_index(str(root)).get(name.replace(" ", "_")) if root else None
    if offset is None:
        return None
    lemmas, pointers, _ = _wordnet_record(root, offset)
    broader, frontier, seen = [], pointers.get("@", []) + pointers.get("@i", []), set()
    while frontier:  # breadth first: the nearest hypernyms come first
        nxt = []
        for off in frontier:
            if off in seen:
                continue
            seen.add(off)
            up_lemmas, up, _ = _wordnet_record(root, off)
            broader.append(up_lemmas[0])
            nxt += up.get("@", []) + up.get("@i", [])
        frontier = nxt
    narrower = [_wordnet_record(root, off)[0][0] for off in pointers.get("~", []) + pointers.get("~i", [])]
    return {"synonyms": [w for w in lemmas if w != name], "broader": broader, "narrower": narrower}


def wordnet_descriptions(name: str) -> list[str] | None:
    """[definition, "a kind of <hypernym>..."] from WordNet's first noun sense of `name`, or None."""
    root = wordnet_dir()
    if root is None:
        return None
    offset = _wordnet_index(str(root)).get(name.replace(" ", "_"))
    if offset is None:
        return None
    lemmas, hypernyms, gloss = _wordnet_synset(root, offset)
    definition = gloss.split('; "')[0].split(";")[0].strip()  # drop the quoted usage examples
    definition = re.sub(r"^\([^)]*\)\s*", "", definition)  # "(astronomy) a celestial body" → "a celestial body"
    if not definition:
        return None
    second = None
    if hypernyms:
        parent = _wordnet_synset(root, hypernyms[0])[0][0]
        second = f"a kind of {parent}"
        others = [w for w in lemmas if w != name]
        if others:
            second += f", also called {others[0]}"
    return [definition, second or fill_template(FALLBACK_DESCRIPTIONS[0], name)]


def describe(name: str) -> list[str]:
    """NUM_DESCRIPTIONS natural-language descriptions of a class: descriptions.json, else WordNet, else templates."""
    key = normalize_class(name)
    table, aliases = _descriptions()
    keys = [key, aliases.get(key, "")] + (key.split("/") if "/" in key else [])  # "t-shirt/top" → "t-shirt"
    for k in keys:
        if k in table:
            return list(table[k][:NUM_DESCRIPTIONS])
    for k in [key] + (key.split("/") if "/" in key else []):
        found = wordnet_descriptions(k) if k else None
        if found:
            return found[:NUM_DESCRIPTIONS]
    return [fill_template(t, key or name) for t in FALLBACK_DESCRIPTIONS]


def class_variants(name: str) -> list[str]:
    """Exactly NUM_VARIANTS strings for one class: the plain name, the TEMPLATES, then `describe(name)`."""
    plain = re.sub(r"\s+", " ", name).strip()
    if not plain:
        raise TinaError("a class name is empty; give every class a name")
    subject = normalize_class(plain) or plain.lower()
    variants = [plain] + [fill_template(t, subject) for t in TEMPLATES] + describe(plain)
    assert len(variants) == NUM_VARIANTS, variants
    return variants
