"""The evaluation protocol: generate, score against the baselines, summarise, write the reports."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.baselines import ZooPool, head_rows, mean_flat, retrieval_flat, selection_flat, with_rows
from evaluation.config import RESULTS_FORMAT, EvalConfig
from evaluation.finetune import finetune_budget
from evaluation.inputs import encoder_or_none, image_prompt_ok, resolve_inputs
from evaluation.prompts import Conditions, unit
from evaluation.report import results_markdown, write_plots
from evaluation.scoring import flat_accuracies
from evaluation.statistics import split_summary
from tina.errors import TinaError

log = logging.getLogger(__name__)


def _sample_images(dataset, class_ids: list[int], n: int, rng: np.random.Generator) -> list[torch.Tensor]:
    y = np.asarray(dataset.train_y)
    out = []
    for c in class_ids:
        idx = np.flatnonzero(y == c)
        x, _ = dataset.tensors("train", np.sort(rng.choice(idx, min(n, len(idx)), replace=False)))
        out.append(x)
    return out


def _generate(tina, items: list[tuple], seed: int, cfg: EvalConfig, bar) -> dict:
    """items: (item_id, Task). All of them in batched generate_tasks calls (grouped by k); item_id → flat."""
    items = sorted(items, key=lambda it: len(it[1].classes))
    out = {}

    def run(chunk):
        try:
            nets = tina.generate_tasks([t for _, t in chunk], seed=seed, steps=cfg.steps, guidance=cfg.guidance,
                                       sampler=cfg.sampler)
        except TinaError:  # non-finite weights somewhere: narrow down, the bad task scores chance
            if len(chunk) == 1:
                out[chunk[0][0]] = torch.full((tina.bundle.layout.num_params(len(chunk[0][1].classes)),), float("nan"))
                return
            half = len(chunk) // 2
            run(chunk[:half])
            run(chunk[half:])
            return
        for (key, _), net in zip(chunk, nets):
            out[key] = tina.bundle.layout.flatten(net.state_dict())

    for lo in range(0, len(items), cfg.batch_size):
        chunk = items[lo : lo + cfg.batch_size]
        run(chunk)
        bar.update(len(chunk))
    return out



def evaluate(cfg: EvalConfig) -> dict:
    """Run the protocol; write results.json, results.md, plots and the resolved config to cfg.out; return the results."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from tina.accuracy import task_test_set
    from tina.config import save_config, to_dict
    from tina.data import load_split
    from tina.sample import Task

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    zoo, man, tina, dataset = resolve_inputs(cfg)
    bundle, layout = tina.bundle, tina.bundle.layout
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "eval_config.yaml")
    notes: list[str] = []

    # -- the tasks ------------------------------------------------------------------------------
    train_models = load_split(zoo, "train")
    pool = ZooPool.from_models(train_models)
    limit = cfg.tasks or None
    splits: dict[str, list[dict]] = {}
    for s in cfg.splits:
        models = train_models[:limit] if s == "train" else load_split(zoo, s, limit=limit)
        if models:
            splits[s] = models
        else:
            notes.append(f"split {s!r} skipped: the zoo has no models in it")
    if not splits:
        raise TinaError(f"zoo {zoo} has no models in the splits {cfg.splits}")
    ex = cfg.expect
    n_tasks = sum(len(v) for v in splits.values())
    if n_tasks < ex.min_tasks:
        raise TinaError(f"this setting evaluates at least {ex.min_tasks} tasks; zoo {zoo} provides {n_tasks} in {list(splits)}")
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
                            imgs = _sample_images(dataset, m["class_ids"], n, rng)
                            task = tina.make_task(classes=list(m["classes"]), images=dict(zip(m["classes"], imgs)))
                            items.append((((s, f, i), seed), task))
            for ((s, f, i), sd), flat in _generate(tina, items, seed, cfg, bar).items():
                perm = perms.get((s, f, i))
                if perm:  # generated row j belongs to class perm[j]: put it back in the task's order
                    rows = head_rows(layout, flat)
                    restored = torch.empty_like(rows)
                    restored[perm] = rows
                    flat = with_rows(layout, flat[: layout.body_size], restored)
                flats[(s, f, i, sd)] = flat
    gen_seconds = time.perf_counter() - t_gen

    # -- baselines and scoring, one task at a time ----------------------------------------------------
    generic = load_file(zoo / "generic.safetensors") if "selection" in cfg.baselines or cfg.finetune.tasks else None
    per_class = cfg.images_per_class or None
    results: dict = {"format": RESULTS_FORMAT, "checkpoint": str(bundle.path), "zoo": str(zoo),
                     "dataset": dataset.name, "target": bundle.target, "text_encoder": bundle.text_encoder,
                     "generator": bundle.meta.get("training", {}), "seeds": seeds, "forms": all_forms,
                     "baselines": list(cfg.baselines), "config": to_dict(cfg), "splits": {}}
    n_models = 0
    with tqdm(total=sum(len(v) for v in splits.values()), desc="score", unit="task", disable=None) as bar:
        for s, models in splits.items():
            per_task = []
            for i, m in enumerate(models):
                k = len(m["classes"])
                x, y = task_test_set(dataset, m["class_ids"], per_class)
                rows, names = [], []
                for f in all_forms:
                    for sd in seeds:
                        rows.append(flats[(s, f, i, sd)])
                        names.append((f, sd))
                hit = None
                for b in cfg.baselines:
                    if b == "oracle":
                        rows.append(m["params"])
                    elif b == "selection":
                        rows.append(selection_flat(layout, generic, m["class_ids"]))
                    elif b == "retrieval":
                        flat, hit = retrieval_flat(layout, pool, unit(m["emb"][:, 0]))
                        rows.append(flat)
                    elif b == "mean":
                        rows.append(mean_flat(layout, pool, m["class_ids"]))
                    names.append((b, None))
                acc = flat_accuracies(bundle, torch.stack(rows), k, x, y, cfg.eval_batch, cfg.device).tolist()
                n_models += len(rows)
                rec = {"key": m["key"], "classes": list(m["classes"]), "class_ids": list(m["class_ids"]), "k": k,
                       "test_images": int(len(y)), "zoo_oracle": m["metrics"].get("oracle_acc"),
                       "zoo_selection": m["metrics"].get("selection_acc"), "generated": {f: [] for f in all_forms}}
                for (name, sd), a in zip(names, acc):
                    if sd is None:
                        rec[name] = a
                    else:
                        rec["generated"][name].append(a)
                if hit is not None:
                    rec["retrieved"] = {"key": hit["key"], "score": hit["score"], "rows": hit["rows"]}
                per_task.append(rec)
                bar.update(1)
            results["splits"][s] = split_summary(per_task, all_forms, cfg.baselines)

    # -- fine-tuning budget --------------------------------------------------------------------------
    if cfg.finetune.tasks and generic is not None:
        results["finetune_budget"] = finetune_budget(cfg, man, bundle, dataset, splits, results, generic)

    for s, r in results["splits"].items():
        h = r["headline"]
        if "gain_captured" in h and h["oracle"] - h["selection"] < 0.02:
            notes.append(f"{s}: oracle − selection is only {h['oracle'] - h['selection']:.3f}, so gain captured "
                         f"({h['gain_captured']:.2f}) is dominated by noise; compare accuracies directly")
    main_split = "unseen_combo" if "unseen_combo" in results["splits"] else next(iter(results["splits"]))
    results["headline"] = {"split": main_split, **results["splits"][main_split]["headline"]}
    results["notes"] = notes
    results["timing"] = {"seconds": round(time.perf_counter() - t_start, 1), "generation_seconds": round(gen_seconds, 1),
                         "generated_models": len(flats), "models_per_second": round(len(flats) / max(gen_seconds, 1e-9), 1),
                         "scored_models": n_models, "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_markdown(results))
    if cfg.plots:
        results["plots"] = write_plots(results, out)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    log.info("evaluation written to %s in %.0f s", out, results["timing"]["seconds"])
    return results


