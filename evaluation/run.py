"""The evaluation protocol: generate, score against the baselines, summarise, write the reports."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch

from evaluation import novelty
from evaluation.baselines import HeadComposition, TextRetrieval, head_rows, selection_flat, with_rows
from evaluation.config import RESULTS_FORMAT, EvalConfig
from evaluation.finetune import finetune_budget
from evaluation.generation import generate_flats, sample_images
from evaluation.inputs import encoder_or_none, image_prompt_ok, resolve_inputs, scan_zoo
from evaluation.prompts import Conditions, unit
from evaluation.report import results_markdown, write_plots
from evaluation.scoring import accuracies, disagreement, flat_probs
from evaluation.statistics import split_summary
from tina.atomic import atomic_write_text
from tina.training.accuracy import MIN_ORACLE_GAIN
from tina.errors import TinaError
from tina.validate import writable_folder
from zoo_builder.tasks import nearest_known

log = logging.getLogger(__name__)


def evaluate(cfg: EvalConfig) -> dict:
    """Run the protocol; write results.json, results.md, plots and the resolved config to cfg.out; return the results."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from tina.training.accuracy import task_test_set
    from tina.config import save_config, to_dict
    from tina.training.data import load_split, read_manifest
    from tina.sample import Task

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    zoo, man, tina, dataset = resolve_inputs(cfg)
    bundle, layout = tina.bundle, tina.bundle.layout
    out = writable_folder(cfg.out, "out")
    save_config(cfg, out / "eval_config.yaml")
    notes: list[str] = []

    # -- the tasks ------------------------------------------------------------------------------
    limit = cfg.tasks or None
    splits: dict[str, list[dict]] = {}
    for s in cfg.splits:
        models = load_split(zoo, s, limit=limit)  # only the evaluated tasks are held; baselines stream the zoo
        if models:
            splits[s] = models
        else:
            notes.append(f"split {s!r} skipped: the zoo has no models in it")
    if not splits:
        raise TinaError(f"zoo {zoo} has no models in the splits {cfg.splits}")
    ex = cfg.expect
    n_tasks = sum(len(v) for v in splits.values())
    if n_tasks < ex.min_tasks:  # a reduced run (a smaller zoo, fewer tasks) is allowed and labelled as such
        notes.append(f"reduced run: {n_tasks} tasks in {list(splits)}, fewer than the {ex.min_tasks} of the full setting")
        log.warning("%s", notes[-1])
    if ex.k is not None:
        bad = sorted({len(m["classes"]) for v in splits.values() for m in v} - {ex.k})
        if bad:
            raise TinaError(f"this setting needs tasks of exactly {ex.k} classes; zoo {zoo} has tasks with k={bad}")

    # -- conditions -----------------------------------------------------------------------------
    forms = list(cfg.forms)
    needs_encoder = {"heldout_template", "paraphrase", "random_text", "unrelated_words"} & set(forms)
    encoder = encoder_or_none(tina, notes) if needs_encoder else None
    if encoder is None:
        forms = [f for f in forms if f not in ("heldout_template", "paraphrase")]
    vocab_path = zoo / "vocab.safetensors"
    vocab_names = load_file(vocab_path)["names"].float() if vocab_path.is_file() else bundle.vocab_emb.float()
    conds = Conditions(man, vocab_names, encoder, cfg.seed, notes)
    if not conds.stored_ok:
        notes.append(f"zoo has {conds.num_variants} variants per class, not tina.prompts' layout: template/description skipped")
        forms = [f for f in forms if f not in ("template", "description")]
    image_forms = [f"image_{n}shot" for n in cfg.image_shots] if cfg.image_shots and image_prompt_ok(tina, notes) else []
    all_forms = forms + image_forms
    seeds = [cfg.seed + i for i in range(cfg.seeds)]

    tasks_by_form: dict[tuple, Task] = {}  # (split, form, i) -> Task (same for every seed)
    perms: dict[tuple, list[int]] = {}
    for si, (s, models) in enumerate(splits.items()):
        if encoder is not None:  # one encoder call for all texts of the split
            conds.encode([t for f in forms for i, m in enumerate(models) for t in (conds.texts(f, m, si, i) or [])])
        for i, m in enumerate(models):
            for f in forms:
                c, perm = conds.cond(f, m, si, i)
                names = [m["classes"][j] for j in perm] if perm else list(m["classes"])
                tasks_by_form[(s, f, i)] = Task(names, f, c)
                if perm:
                    perms[(s, f, i)] = perm

    # -- generation: every (split, form, task) of a seed in batched calls ------------------------------
    flats: dict[tuple, torch.Tensor] = {}  # (split, form, i, seed) -> flat, head rows in the task's class order
    total = len(seeds) * (len(tasks_by_form) + sum(len(v) for v in splits.values()) * len(image_forms))
    t_gen = time.perf_counter()
    with tqdm(total=total, desc="generate", unit="model", disable=None) as bar:
        for seed in seeds:
            items = [((key, seed), task) for key, task in tasks_by_form.items()]
            if image_forms:
                rng = np.random.default_rng(seed)
                for s, models in splits.items():
                    for i, m in enumerate(models):
                        for f, n in zip(image_forms, cfg.image_shots):
                            imgs = sample_images(dataset, m["class_ids"], n, rng)
                            task = tina.make_task(classes=list(m["classes"]), images=dict(zip(m["classes"], imgs)))
                            items.append((((s, f, i), seed), task))
            for ((s, f, i), sd), flat in generate_flats(tina, items, seed, cfg.batch_size, bar, steps=cfg.steps, guidance=cfg.guidance, sampler=cfg.sampler,
                                                          strength=cfg.strength).items():
                perm = perms.get((s, f, i))
                if perm:  # generated row j belongs to class perm[j]: put it back in the task's order
                    rows = head_rows(layout, flat)
                    restored = torch.empty_like(rows)
                    restored[perm] = rows
                    flat = with_rows(layout, flat[: layout.body_size], restored)
                flats[(s, f, i, sd)] = flat
    gen_seconds = time.perf_counter() - t_gen

    # -- baselines that need the training zoo: one streamed pass over all of it ---------------------------
    baselines = [b for b in cfg.baselines if b != "zeroshot" or bundle.projector]
    if "zeroshot" in cfg.baselines and not bundle.projector:
        notes.append("zeroshot skipped: the checkpoint has no image projector")
    generic = load_file(zoo / "generic.safetensors") if {"selection", "compose_generic_body"} & set(baselines) or cfg.finetune.tasks else None
    order = [(s, i) for s, models in splits.items() for i in range(len(models))]
    retrieval = TextRetrieval([unit(splits[s][i]["emb"][:, 0]) for s, i in order]) if "retrieval" in baselines else None
    compose = HeadComposition(layout)
    probe = [(s, i) for s, models in splits.items() for i in range(min(len(models), cfg.novelty.tasks))]
    nearest = novelty.NearestZoo(layout, [(splits[s][i]["class_ids"], torch.stack([flats[(s, "names", i, sd)] for sd in seeds]), None)
                                          for s, i in probe] +
                                 [(splits[s][i]["class_ids"], splits[s][i]["params"][None], splits[s][i]["key"]) for s, i in probe])
    same_set = novelty.SameSetRuns(layout, cfg.novelty.pairs) if probe else None
    t_scan = time.perf_counter()
    scanned = scan_zoo(zoo, "train", [c for c in (retrieval, compose, nearest, same_set) if c is not None])
    notes.append(f"retrieval, head composition and nearest-model search streamed all {scanned} training models "
                 f"(manifest: {read_manifest(zoo)['counts'].get('train')}) in {time.perf_counter() - t_scan:.0f} s")
    generic_body = selection_flat(layout, generic, [0])[: layout.body_size] if generic is not None else None
    held = read_manifest(zoo).get("held_out_classes", [])
    proxy = nearest_known(load_file(zoo / "vocab.safetensors")["names"], held) if held else {}
    hyper_flats, hyper_record = {}, None
    if "hypernet" in baselines:
        from evaluation.hypernet import hypernet_flat, train_hypernet

        hyper, hyper_record = train_hypernet(bundle, zoo, cfg.hypernet, cfg.device, dataset)
        hyper_flats = {(s, i): hypernet_flat(hyper, bundle, tasks_by_form[(s, "names", i)].cond) for s, i in order}
    zeroshot = None
    if "zeroshot" in baselines:
        from evaluation.zeroshot import ZeroShot

        zeroshot = ZeroShot(bundle)

    def baseline_flat(b: str, s: str, i: int, m: dict) -> torch.Tensor:
        if b == "oracle":
            return m["params"]
        if b == "selection":
            return selection_flat(layout, generic, m["class_ids"], proxy)
        if b == "retrieval":
            return retrieval.flat(layout, order.index((s, i)))
        if b == "compose_zoo_body":
            return compose.flat(m["class_ids"])
        if b == "compose_generic_body":
            return compose.flat(m["class_ids"], generic_body)
        return hyper_flats[(s, i)]  # hypernet

    # -- scoring, one task at a time ----------------------------------------------------------------------
    per_class = cfg.images_per_class or None
    results: dict = {"format": RESULTS_FORMAT, "checkpoint": str(bundle.path), "zoo": str(zoo),
                     "dataset": dataset.name, "target": bundle.target, "text_encoder": bundle.text_encoder,
                     "generator": bundle.meta.get("training", {}), "seeds": seeds, "forms": all_forms,
                     "baselines": baselines, "config": to_dict(cfg), "splits": {}, "zoo_models_searched": scanned}
    if hyper_record is not None:
        results["hypernet"] = hyper_record
    n_models, novelty_records = 0, {s: [] for s in splits}
    with tqdm(total=len(order), desc="score", unit="task", disable=None) as bar:
        for s, models in splits.items():
            per_task = []
            for i, m in enumerate(models):
                k = len(m["classes"])
                x, y = task_test_set(dataset, m["class_ids"], per_class)
                named = [((f, sd), flats[(s, f, i, sd)]) for f in all_forms for sd in seeds]
                named += [((b, None), baseline_flat(b, s, i, m)) for b in baselines if b != "zeroshot"]
                probs = flat_probs(bundle, torch.stack([f for _, f in named]), k, x, cfg.eval_batch, cfg.device)  # (M, n, k)
                acc = accuracies(probs, y).tolist()
                n_models += len(named)
                rec = {"key": m["key"], "classes": list(m["classes"]), "class_ids": list(m["class_ids"]), "k": k,
                       "test_images": int(len(y)), "zoo_oracle": m["metrics"].get("oracle_acc"),
                       "zoo_selection": m["metrics"].get("selection_acc"), "generated": {f: [] for f in all_forms}}
                for ((name, sd), _), a in zip(named, acc):
                    if sd is None:
                        rec[name] = a
                    else:
                        rec["generated"][name].append(a)
                if zeroshot is not None:
                    rec["zeroshot"] = zeroshot.accuracy(m["emb"][:, 0], x, y)
                if retrieval is not None:
                    rec["retrieved"] = retrieval.hit(order.index((s, i)))
                if (s, i) in probe:
                    keys = [n for n, _ in named]
                    novelty_records[s] += _novelty_records(
                        bundle, nearest, probe.index((s, i)), len(probe), m, [flats[(s, "names", i, sd)] for sd in seeds],
                        [probs[keys.index(("names", sd))] for sd in seeds],
                        probs[keys.index(("oracle", None))] if ("oracle", None) in keys else None,
                        compose.flat(m["class_ids"]), x, cfg)
                per_task.append(rec)
                bar.update(1)
            results["splits"][s] = split_summary(per_task, all_forms, baselines, cfg.bootstrap)

    # -- memorization: nearest zoo models against the zoo's own same-set runs -------------------------------
    if probe:
        for p in same_set.pairs:
            x, _ = task_test_set(dataset, p["class_ids"], per_class)
            pp = flat_probs(bundle, p["flats"], len(p["class_ids"]), x, cfg.eval_batch, cfg.device)
            p["agreement"] = 1.0 - disagreement(pp[0], pp[1])
        pairs = [{n: p[n] for n in ("class_ids", "keys", "distance", "agreement")} for p in same_set.pairs]
        results["novelty"] = {"splits": {s: novelty.summarize(r, pairs, cfg.novelty.copy_factor) for s, r in novelty_records.items() if r},
                              "same_set_pairs": pairs, "per_model": novelty_records}
        if not pairs:
            notes.append("novelty: no two training runs of the same class set were streamed; the reference distance is the "
                         "task oracle's to its nearest other training model")

    # -- diversity and multi-step sampling ----------------------------------------------------------------
    if cfg.diversity.tasks and cfg.diversity.steps:
        from evaluation.diversity import measure

        ds = cfg.diversity.split if cfg.diversity.split in splits else next(iter(splits))
        chosen = splits[ds][: cfg.diversity.tasks]
        results["diversity"] = {"split": ds, **measure(
            tina, [tasks_by_form[(ds, "names", i)] for i in range(len(chosen))],
            [task_test_set(dataset, m["class_ids"], per_class) for m in chosen], cfg.diversity, cfg.seed, cfg.batch_size,
            cfg.eval_batch, cfg.device, cfg.guidance, cfg.strength)}
        if results.get("novelty"):
            results["diversity"]["zoo_same_set_disagreement"] = (
                1.0 - results["novelty"]["splits"].get(ds, next(iter(results["novelty"]["splits"].values())))["same_set_agreement"]
                if any(p.get("agreement") is not None for p in results["novelty"]["same_set_pairs"]) else None)

    if zeroshot is not None:
        from evaluation.zeroshot import sizes

        ks = sorted({len(m["classes"]) for v in splits.values() for m in v})
        results["sizes"] = [sizes(bundle, zeroshot, k) for k in ks]

    # -- fine-tuning budget --------------------------------------------------------------------------
    if cfg.finetune.tasks and generic is not None:
        results["finetune_budget"] = finetune_budget(cfg, man, bundle, dataset, splits, results, generic)

    for s, r in results["splits"].items():
        h = r["headline"]
        if "gain_captured" in h and h["gain_captured"] is None:
            notes.append(f"{s}: oracle − selection is only {h['oracle'] - h['selection']:.3f} (< {MIN_ORACLE_GAIN}), so gain "
                         "captured is undefined (n/a); compare accuracies directly")
    main_split = "unseen_combo" if "unseen_combo" in results["splits"] else next(iter(results["splits"]))
    results["headline"] = {"split": main_split, **results["splits"][main_split]["headline"]}
    results["notes"] = notes
    results["timing"] = {"seconds": round(time.perf_counter() - t_start, 1), "generation_seconds": round(gen_seconds, 1),
                         "generated_models": len(flats), "models_per_second": round(len(flats) / max(gen_seconds, 1e-9), 1),
                         "scored_models": n_models, "threads": torch.get_num_threads()}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", results_markdown(results))
    if cfg.plots:
        results["plots"] = write_plots(results, out)
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    log.info("evaluation written to %s in %.0f s", out, results["timing"]["seconds"])
    return results




def _novelty_records(bundle, nearest, q: int, n_probe: int, m: dict, gen_flats: list, gen_probs: list, oracle_probs,
                     average: torch.Tensor, x: torch.Tensor, cfg) -> list[dict]:
    """Per generated model (names prompt, one per seed) of one task: its nearest training model, their distance
    and agreement on the test images, its distance to the head-composition average; and the same for the
    task's oracle against its nearest *other* training model (the control)."""
    layout, k = bundle.layout, len(m["classes"])
    g, o = nearest.best[q], nearest.best[n_probe + q]
    found = [j for j, f in enumerate(g["flat"]) if f is not None]
    ref = [o["flat"][0]] if o["flat"][0] is not None else []
    near = torch.stack([g["flat"][j] for j in found] + ref) if found or ref else None
    near_probs = flat_probs(bundle, near, k, x, cfg.eval_batch, cfg.device) if near is not None else None
    out = []
    for j, flat in enumerate(gen_flats):
        d = float(g["distance"][j])
        rec = {"key": m["key"], "seed": j, "nearest": g["key"][j], "distance": d if np.isfinite(d) else None,
               "distance_average": float(novelty.normalized_distance(layout, flat, average, k))}
        if j in found:
            rec["agreement"] = 1.0 - disagreement(gen_probs[j], near_probs[found.index(j)])
        if ref:
            rec["oracle_nearest"], rec["oracle_distance"] = o["key"][0], float(o["distance"][0])
            if oracle_probs is not None:
                rec["oracle_agreement"] = 1.0 - disagreement(oracle_probs, near_probs[-1])
        out.append(rec)
    return out
