"""The clip-art dataset: ~40 classes curated from Debian's `openclipart-png` by rules, rendered once and cached.

The resulting class list is in docs/clipart.md.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from tina.errors import TinaError
from tina.images import DATASET_MAX_PIXELS as MAX_PIXELS
from tina.training.datasets.core import CACHE_FORMAT, ROOT_OPTION, ImageDataset, default_cache_dir
from tina.training.datasets.render import (
    _cache_arrays,
    _dataset_from_render,
    _file_fingerprint,
    _load_npz,
    _render_many,
    _save_npz,
    _sha1_json,
    _unit_hash,
    group_key,
    render_frame,
)

log = logging.getLogger(__name__)

CLIPART_ROOT = "/usr/share/openclipart/png"  # Debian's openclipart-png


@dataclass(frozen=True)
class ClassRule:
    """Which Open Clip Art files form (part of) a class. A file takes the first rule it matches.

    A file matches when one of its paths (the file or a symlink to it) lies under one of
    `folders` (anywhere when empty) and not under `exclude_folders`, and its name (no extension,
    searched case-insensitively) matches `keywords` (when set) but not `exclude`.
    """

    name: str  # the human-readable class name; several rules may feed one class
    folders: tuple[str, ...] = ()
    keywords: str | None = None
    exclude: str | None = None
    exclude_folders: tuple[str, ...] = ()

    def matches(self, relpath: str, stem: str) -> bool:
        """`relpath` relative to the clip-art root with '/' separators; `stem` the name without extension."""
        if self.folders and not relpath.startswith(self._prefixes[0]):
            return False
        if self.exclude_folders and relpath.startswith(self._prefixes[1]):
            return False
        keywords, exclude = self._patterns
        return (keywords is None or keywords.search(stem) is not None) and not (exclude and exclude.search(stem))

    @cached_property
    def _prefixes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(f + "/" for f in self.folders), tuple(f + "/" for f in self.exclude_folders)

    @cached_property
    def _patterns(self):
        return tuple(re.compile(p, re.IGNORECASE) if p else None for p in (self.keywords, self.exclude))


R = ClassRule
# Ordered: earlier, more specific rules claim a file first (signal flags before flags, clothing
# before sports equipment, drinks before fruit so juice boxes are drinks). docs/clipart.md has the why.
CLIPART_RULES: tuple[ClassRule, ...] = (
    R("signal flag", ("signs_and_symbols/flags",), keywords=r"^signalflag"),
    R("flag", ("signs_and_symbols/flags",), exclude=r"golf|southen_cross",
      exclude_folders=("signs_and_symbols/flags/semaphore",)),
    R("playing card", ("recreation/games/cards",),
      exclude=r"andalusia|cassette|boy_face|celtic|leisler|photo|two_cats|cartes"),
    R("jigsaw puzzle piece", ("shapes/jigsaw",)),
    R("pattern", ("special/patterns",), exclude=r"model-view"),
    R("led light", ("signs_and_symbols/led",), exclude=r"rainbow"),
    R("pictogram", ("signs_and_symbols/map_symbols", "transportation/aiga-symbols", "computer/icons"),
      keywords=r"^aiga_|^hotel_icon"),
    R("safety sign", ("signs_and_symbols",),
      keywords=r"yves_gu|protection_obligatoire|sortie_issue|danger|hazard|radioactive|no_smoking|nosmoke"
               r"|inflammable|toxique|corrosi|matieres|radiations|rayonnement|risque|trebuchement|vehicules"
               r"|marquage|temperature|magneti|charges|chute",
      exclude=r"flag|^_|advertising", exclude_folders=("signs_and_symbols/flags", "signs_and_symbols/map_symbols")),
    R("road sign", ("transportation/roadsigns",), exclude=r"ampel|nws_gov|route_jakob|advertising"),
    R("weather symbol", ("signs_and_symbols/weather",)),
    R("weather symbol", ("signs_and_symbols",), keywords=r"cloud|sun|rain|snow|storm|lightning|moon|weather|nuage",
      exclude=r"tsunami|thought|sunwheel|flame|led|sung|taichi", exclude_folders=("signs_and_symbols/flags",)),
    R("smiley face", ("people/smilies",), exclude=r"crossbones|portrait|3_faces"),
    R("stick figure", ("people/stickmen",)),
    # four icon families: each theme's folder layout (filesystems, mimetypes, devices, actions, apps)
    R("folder icon", ("computer",), keywords=r"folder|fldr|plastik_icon|directory",
      exclude=r"box_with|fancy|cartella|bookmark"),
    R("file icon", ("computer/icons",), keywords=r"mime|document|^file|^doc|txt|pdf"),
    R("file icon", ("computer/icons/lemon-theme/mimetypes", "computer/icons/etiquette-theme/mimetypes")),
    R("device icon", ("computer/icons/flat-theme/device", "computer/icons/lemon-theme/devices",
                      "computer/icons/etiquette-theme/devices")),
    R("toolbar icon", ("computer/icons/flat-theme/action", "computer/icons/lemon-theme/actions",
                       "computer/icons/etiquette-theme/actions")),
    R("app icon", ("computer/icons/flat-theme/applications", "computer/icons/lemon-theme/apps",
                   "computer/icons/etiquette-theme/apps", "computer/icons/applications")),
    R("arrow", ("shapes/arrows", "computer/buttons"), keywords=r"arrow|direction", exclude=r"^tasto"),
    R("button", ("computer/buttons", "buttons"), exclude=r"shopping_cart"),
    R("button", ("computer", "shapes", "unsorted"), keywords=r"button|pulsante|tasto",
      exclude_folders=("shapes/stars", "shapes/arrows")),
    R("computer hardware", ("computer",),
      exclude=r"^bb_|folder|cloud|network|logic|model-view|linux|tux|jabbear|chomper|munch|teacher|building"
              r"|residential|internet|virus|user|reload|home|otto|clipboard|sand_glass|ebuild|preenchimento"
              r"|part_of_the|pastas|phone|aviso|browser|bluepane|the_electronic|io_anthony|finestr|plush|pacman|packman"
              r"|pong|tetris|pointer",
      exclude_folders=("computer/icons", "computer/buttons", "computer/folders", "computer/diagrams")),
    R("electronic device", ("electronics", "office/telephone"),
      exclude=r"capacitor|diode|resistor|transistor|bobine|filmphoto|navigation|pfd"),
    R("musical instrument", ("recreation/music",),
      keywords=r"drum|guitar|cello|derbouk|djamb|flute|horn|harp|maracas|dulcimer|oboe|piano_|saxo|trombone"
               r"|trumpet|tpt|violin|xylophone",
      exclude=r"theory"),
    R("clothing", ("people/clothing",),
      exclude=r"feet_in|gold_chain|earring|rings|straw_tote|shoe_print|magic_hat|thongs|jacob_leisler|propeller"),
    R("sports equipment", ("recreation",),
      keywords=r"ball|bat|glove|helmet|racket|racquet|dartboard|golf|rugby|surfboard|tennis|target|cricket"
               r"|badminton|net|anelli|rollerblades|sledge|scuba|nunchaku|cronometro",
      exclude=r"yoga|sport_|golf_drive|roller_blader|judo|karate|hikinh|backpacker|water_skier|plays_soccer"
              r"|beckham|sportcar|football_pitch|ballerina|balloon|baloon|heart-ballons"),
    R("insect", ("animals/bugs",), exclude=r"lumaca|virus|mostriciattolo|amibe"),
    R("bird", ("animals/birds",), exclude=r"bat|wing|manager|simbolo|turkey|tux"),
    R("bird", ("unsorted", "animals"), keywords=r"pinguin|penguin|anatra|papera|colombo|pennuto|struzzo|gabbiano",
      exclude=r"tux"),
    R("mammal", ("animals/mammals",), exclude=r"emule|mascot"),
    R("tree", (), keywords=r"fall_scene|tree|albero|arbre|palm|sapin|conifer|deciduous|evergreen|olivier_one|bamboo",
      exclude=r"wreath|christmas_balls|treeb|palm_0|cleanpalm|procman|_tree$|sidetree|krtree|view_tree|street",
      exclude_folders=("computer",)),
    R("drink", ("food",),
      keywords=r"juice|drink|coffe|(^|_)tea|milk|glass|mug|lemonade|pop_can|soda|beer|birra|wine|cuppa|tazza"
               r"|kubek|bottle",
      exclude=r"flower-pot|fondue|bread_and_wine"),
    R("fruit", ("food",),
      keywords=r"apple|banana|cherr|grape|lemon|lime|melon|orange|peach|pear|pera|pesca|pineapple|prune|prugna"
               r"|pasteque|strawberr|fruit",
      exclude=r"pie_|candied|juice|tote|grenade|champignon|gumnut|eris|kallisti|turkey"),
    R("dessert", ("food", "recreation/party"),
      keywords=r"cake|cone|glace|gelato|ice_cream|candy|lollipop|muffin|pie_|flan|gateau|gauffre|pudim|torta"
               r"|cookie|candied|marshmallow",
      exclude=r"egg",
      exclude_folders=("food/breads_and_carbs",)),
    R("meal", ("food",),
      exclude=r"pumpkin|zucca|pomodori|champignon|gumnut|watermelon|potato_nicu|chef|menu|plate|meatgrinder|frullatore"
              r"|libro|come_si|crawfish|toque|sugarbox|honey|frying_pan|fuoco|mcoon",
      exclude_folders=("food/beverages", "food/fruit", "food/desserts", "food/vegetables")),
    R("flower", ("plants", "unsorted", "signs_and_symbols"),
      keywords=r"flower|fiore|fiori|daffodil|daisy|rose|rosa|tulip|magnolia|sakura|geranium|lotas|bloom|bouquet"
               r"|daff|azalea|daylily|foxglove|hosta|hydrangea|trillium|mirjam",
      exclude=r"tree|vestito"),
    R("person", ("people",),
      exclude=r"box_with|inservice|frying_pan|card_figure|skull|baby_bottle|fingerprint|chat_icon|fire_engine"
              r"|icons_lumen|handshake|hand_print|eye|reminder|safety_pin|samoa|gender|van_gogh|wedding_sign"
              r"|xbill|alien|hygieia|profile|3_faces|don_t_panic|head\d|^ppl|cm1|buddy|boy_symbol|girl_symbol"
              r"|enthusiast|^people$|blacksmiti",
      exclude_folders=("people/smilies", "people/stickmen", "people/bodypart", "people/clothing")),
    R("person", ("unsorted",),
      keywords=r"ragazz|signorina|principessa|carpentiere|traslocatore|imbianchino|corridore|pesistica"
               r"|trekking|mr_lakshman|otto_needs|^donna"),
    R("map", ("geography", "signs_and_symbols/map_symbols"),
      keywords=r"map|carte|australia|wales|territory|queensland|tasmania|victoria|andalusia|aragon|asturias"
               r"|balear|basque|brazil|canar|cantabria|castilla|catalunya|europe|euskadi|extremadura|galicia"
               r"|madrid|murcia|navarra|oceania|africa|rios|spain|spanish|valencia|romania|ukrain|michigan"
               r"|amrum|municipios|peters|czech|mapa",
      exclude=r"symbol|rpg"),
    R("building", ("buildings",), exclude=r"brick|wall|capitello|old_sign|demolizione",
      exclude_folders=("buildings/furniture",)),
    R("tool", ("tools",),
      exclude=r"camera|phone|umbrella|lamp|telescope|binocolo|thermometer|smoke|insecticide|gallows|route_jakob"
              r"|panel|kexi|scart|stefan_graubner|natural_gas|nodding|metal_cage|mattone|bottle|pansement"
              r"|toothbrush|lighter|burner|aladino|ferro|ironing|vacuum|vavuum|cage|pan_frouke|scolapasta"
              r"|forchettoni|keyring|key_jordan|lock|padlock|mag\d|magni|lente|nunchaku|bussola|compass",
      exclude_folders=("tools/weapons", "tools/toys")),
    R("stationery", ("office", "education"),
      exclude=r"cross_hand|arrow|phone|lcd|video|floppy|stylized_cd|user_frederic|bluepane|handshake|reunion"
              r"|inservice|fabbrica|liberty|lotion|desk_lamp|lamp|lightbulb|cassa|certificate|cup_|istogramma|diagramma|tabella"
              r"|wooden_table|picture_frame|laser_pointer|lana|megaphone|school|carnegie|chemical|erlenmeyer"
              r"|logaritmic|otto|slate|book|bibl|libro|diary|newspaper|squirrel",
      exclude_folders=("office/telephone",)),
)  # fmt: skip
del R


# "Linked Image Not Found" placeholders that the SVG-to-PNG conversion left in the collection
CLIPART_BROKEN = (
    "animals/birds/duck_yellow_ii_kurt_cagl_.png",
    "animals/birds/penguin/tux_didier_fabert_01.png",
    "people/blacksmiti_ganson.png",
)


@dataclass(frozen=True)
class ClipartCuration:
    """Everything that decides the clip-art dataset's content; its hash names the cache file."""

    rules: tuple[ClassRule, ...] = CLIPART_RULES
    exclude_files: tuple[str, ...] = CLIPART_BROKEN
    min_images: int = 40  # a class with fewer successfully rendered images is dropped
    max_images: int = 300  # larger classes (flags, icons) keep a hash-chosen 300, to stay balanced
    size: int = 32  # rendered side in pixels
    test_fraction: float = 0.2
    max_pixels: int = MAX_PIXELS  # larger files are skipped unread

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClipartPlan:
    """The curated file list before rendering: one entry per distinct file (symlinks folded)."""

    root: str
    paths: list[str] = field(default_factory=list)  # absolute path of each file
    labels: list[str] = field(default_factory=list)  # class name of each file
    unassigned: int = 0  # distinct files no rule claimed
    capped: dict[str, int] = field(default_factory=dict)  # class -> files left out by max_images


def plan_clipart(root: str, curation: ClipartCuration = ClipartCuration()) -> ClipartPlan:
    """Apply the curation rules to the files under `root` (reads names only, decodes nothing)."""
    real_root = os.path.realpath(root)
    aliases: dict[str, list[str]] = {}  # real path -> every relative path that leads to it
    for rel, real in _walk_png(real_root):  # real paths, so symlinks fold into one file
        aliases.setdefault(real, []).append(rel)
    plan = ClipartPlan(root=real_root)
    members: dict[str, list[str]] = {}
    for real in sorted(aliases):
        home = os.path.relpath(real, real_root).replace(os.sep, "/")
        if home in curation.exclude_files:
            continue
        # The file's own folder decides first; the folders that link to it only when that fails
        # (flags/ links to maps in geography/, which are maps, not flags).
        names = [[(home, _stem(home))], [(rel, _stem(rel)) for rel in sorted(aliases[real]) if rel != home]]
        name = next(
            (r.name for group in names for r in curation.rules if any(r.matches(rel, st) for rel, st in group)), None
        )
        if name is None:
            plan.unassigned += 1
        else:
            members.setdefault(name, []).append(real)
    for name in sorted(members):
        files = sorted(members[name], key=lambda p: _unit_hash(name + "/" + os.path.basename(p)))
        if len(files) > curation.max_images:
            plan.capped[name] = len(files) - curation.max_images
            files = files[: curation.max_images]
        for p in sorted(files):
            plan.paths.append(p)
            plan.labels.append(name)
    return plan


def _stem(relpath: str) -> str:
    return os.path.splitext(relpath.rsplit("/", 1)[-1])[0]


def _walk_png(root: str, rel: str = ""):
    """(relative path, real path) of every .png under `root`, symlinked files included once per link.

    Symlinked folders are not followed (os.walk's default), so every file has finitely many names.
    """
    with os.scandir(os.path.join(root, rel)) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            path = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                yield from _walk_png(root, path)
            elif e.name.lower().endswith(".png") and e.is_file():
                yield path, os.path.realpath(e.path) if e.is_symlink() else e.path


def build_clipart(
    root: str,
    cache_dir: str | os.PathLike | None = None,
    curation: ClipartCuration = ClipartCuration(),
    workers: int = 2,
) -> ImageDataset:
    """The curated clip-art dataset, from the cache when it is there, else rendered and cached."""
    if not os.path.isdir(root):
        raise TinaError(
            f"clip art not found at {root}: install it with `apt-get install openclipart-png`, "
            f"or point {ROOT_OPTION} (or $TINA_CLIPART) at a folder of PNG files in category folders"
        )
    plan = plan_clipart(root, curation)
    root = plan.root
    if not plan.paths:
        raise TinaError(f"no clip art under {root} matches the curation rules (is it openclipart-png's png/ folder?)")
    key = _sha1_json(
        {"format": CACHE_FORMAT, "curation": curation.to_dict(), "files": _file_fingerprint(plan.paths, root),
         "labels": plan.labels}
    )  # fmt: skip
    path = Path(cache_dir or default_cache_dir()) / f"clipart-{key[:16]}.npz"
    frame = render_frame(curation.size, crop=True)
    ds = _load_npz(path, "clipart", frame)
    if ds is not None:
        return ds
    start = time.perf_counter()
    images, ok, failures = _render_many(plan.paths, frame, curation.max_pixels, workers, desc="rendering clip art")
    if failures:
        log.warning("clipart: skipped %d of %d files that could not be decoded", len(failures), len(plan.paths))
        for p, err in failures:
            log.debug("skipped %s: %s", p, err)
    labels = np.array(plan.labels)
    counts = {c: int(((labels == c) & ok).sum()) for c in sorted(set(plan.labels), key=str.casefold)}
    classes = [c for c, n in counts.items() if n >= curation.min_images]
    dropped = {c: n for c, n in counts.items() if n < curation.min_images}
    if dropped:
        log.warning("clipart: dropped classes with fewer than %d images: %s", curation.min_images, dropped)
    keep = ok & np.isin(labels, classes)
    index = {c: i for i, c in enumerate(classes)}
    ids = np.array([index[c] for c in labels[keep]], dtype=np.int64)
    rel = [os.path.relpath(p, root) for p in np.array(plan.paths)[keep]]
    ds, test = _dataset_from_render(
        "clipart", classes, images[keep], ids, [group_key(p) for p in rel], curation.test_fraction, frame
    )
    seconds = time.perf_counter() - start
    meta = {
        "root": root, "build_seconds": round(seconds, 1), "unassigned": plan.unassigned, "capped": plan.capped,
        "dropped": dropped, "skipped": [[os.path.relpath(p, root), e] for p, e in failures],
        "train_files": np.array(rel)[~test].tolist(), "test_files": np.array(rel)[test].tolist(),
    }  # fmt: skip
    _save_npz(path, _cache_arrays(ds, meta))
    log.info(
        "clipart: rendered %d images in %d classes in %.1f s (%d skipped); cached at %s (%.1f MB)",
        int(keep.sum()), len(classes), seconds, len(failures), path, path.stat().st_size / 1e6,
    )  # fmt: skip
    return ds
