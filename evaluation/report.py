"""results.md and the PNG plots of an evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.config import HURTING_FORMS, SPLIT_TITLES
from tina.training.accuracy import MIN_ORACLE_GAIN


def _fmt(d: dict | None) -> str:
    if not d or "mean" not in d:
        return "–"
    s = f"{d['mean']:.3f} ± {d['std_tasks']:.3f}"
    if d.get("n_seeds", 1) > 1:
        s += f" (seeds ± {d['std_seeds']:.3f})"
    return s


def results_markdown(r: dict) -> str:
    """The tables of results.md: one row per method, one column per split."""
    splits = list(r["splits"])
    lines = [f"# Tina evaluation: {r['dataset']} / {r['target']} / {r['text_encoder']}", "",
             f"checkpoint `{r['checkpoint']}`, zoo `{r['zoo']}`, seeds {r['seeds']}. Accuracy on real test images, "
             "mean ± std over tasks (± std over seeds of the task mean).", "",
             "| method | " + " | ".join(f"{SPLIT_TITLES.get(s, s)} (n={r['splits'][s]['tasks']})" for s in splits) + " |",
             "|---|" + "---|" * len(splits)]
    for b in r["baselines"]:
        lines.append(f"| {b} | " + " | ".join(_fmt(r["splits"][s]["baselines"].get(b)) for s in splits) + " |")
    for f in r["forms"]:
        label = "**generated: names**" if f == "names" else f"generated: {f}"
        lines.append(f"| {label} | " + " | ".join(_fmt(r["splits"][s]["generated"].get(f)) for s in splits) + " |")
    lines += ["", "## Headline", "", "| split | generated | oracle | selection | generated / oracle | gain captured |",
              "|---|---|---|---|---|---|"]
    for s in splits:
        h = r["splits"][s]["headline"]
        lines.append(f"| {SPLIT_TITLES.get(s, s)} | {h['generated']:.3f} | {h.get('oracle', float('nan')):.3f} | "
                     f"{h.get('selection', float('nan')):.3f} | {h.get('ratio_to_oracle', float('nan')):.3f} | "
                     f"{_num(h.get('gain_captured'))} |")
    lines += ["", f"gain captured = (generated − selection) / (oracle − selection), from the split's mean accuracies; "
              f"– (undefined) when oracle − selection < {MIN_ORACLE_GAIN} (within test-set noise).", ""]
    lines += _differences(r) + _novelty(r) + _diversity(r) + _hypernet_and_sizes(r)
    lines += ["## Does the text steer the weights?", "",
              "| split | check | difference | s.e. | as expected |", "|---|---|---|---|---|"]
    for s in splits:
        for name, c in r["splits"][s]["headline"]["checks"].items():
            lines.append(f"| {SPLIT_TITLES.get(s, s)} | {name} | {c['diff']:+.3f} | {c['se']:.3f} | {'yes' if c['ok'] else '**no**'} |")
    lines += ["", "shuffled_vs_names must be ≈ 0 (equivariance); names_minus_X must be > 0 (wrong text hurts).", "",
              "## Accuracy by k", ""]
    for s in splits:
        by_k = r["splits"][s]["by_k"]
        cols = ["generated"] + [b for b in r["baselines"]] + ["chance"]
        lines += [f"{SPLIT_TITLES.get(s, s)}:", "", "| k | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for k, row in by_k.items():
            lines.append(f"| {k} | {row['n']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
        lines.append("")
    fb = r.get("finetune_budget")
    if fb:
        rec = fb["recipe"]
        lines += ["## Fine-tuning budget", "",
                  f"Fine-tuning from classifier selection ({rec['optimizer']}, lr {rec['lr']}, batch {rec['batch_size']}, "
                  f"zoo oracle = {rec['zoo_steps']} steps) needs a median of **{fb['median_steps_text']} steps** to reach the "
                  f"generated model's accuracy ({fb['reached']}/{fb['tasks']} {SPLIT_TITLES.get(fb['split'], fb['split'])} tasks "
                  f"reached it within {fb['max_steps']} steps).", ""]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    t = r["timing"]
    lines += [f"{t['generated_models']} models generated in {t['generation_seconds']} s ({t['models_per_second']} models/s); "
              f"whole evaluation {t['seconds']} s.", ""]
    return "\n".join(lines)


def _num(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _differences(r: dict) -> list[str]:
    lines = ["## Differences with paired bootstrap 95% intervals", "",
             "Per task, both methods on the same test images; tasks resampled with replacement "
             f"({r['config'].get('bootstrap', 2000)} resamples). generated = names prompt, mean over seeds.", "",
             "| split | difference | mean | 95% interval | excludes 0 |", "|---|---|---|---|---|"]
    for s, v in r["splits"].items():
        for name, d in v["headline"].get("differences", {}).items():
            lines.append(f"| {SPLIT_TITLES.get(s, s)} | {name} | {d['diff']:+.4f} | [{d['lo']:+.4f}, {d['hi']:+.4f}] | "
                         f"{'yes' if d['excludes_zero'] else 'no'} |")
    return lines + [""]


def _novelty(r: dict) -> list[str]:
    nv = r.get("novelty")
    if not nv:
        return []
    lines = ["## Memorization: copies, averages or new models?", "",
             "Distance: RMS weight difference in the layout's normalised units, head rows aligned to the task's classes "
             "(a training model qualifies when it holds every task class). Agreement: share of test images with the same "
             "prediction. Medians. Reference: two training runs of the same class set.", "",
             "| split | models | generated → nearest training model: distance / agreement | to the composition average | "
             "oracle → nearest other: distance / agreement | same-set runs: distance / agreement | copy / average / new |",
             "|---|---|---|---|---|---|---|"]
    for s, v in nv["splits"].items():
        c = v["counts"]
        lines.append(f"| {SPLIT_TITLES.get(s, s)} | {v['models']} | {_num(v['generated_nearest_distance'])} / "
                     f"{_num(v['generated_nearest_agreement'])} | {_num(v['generated_average_distance'])} | "
                     f"{_num(v['oracle_nearest_distance'])} / {_num(v['oracle_nearest_agreement'])} | "
                     f"{_num(v['same_set_distance'])} / {_num(v['same_set_agreement'])} (n={v['same_set_pairs']}) | "
                     f"{c.get('copy', 0)} / {c.get('average', 0)} / {c.get('new', 0)}"
                     + (f" ({c['unknown']} unknown)" if c.get("unknown") else "") + " |")
    f = next(iter(nv["splits"].values()))["copy_factor"] if nv["splits"] else 0.5
    return lines + ["", f"copy: nearer a training model than {f} x the same-set distance; average: that near the head-composition "
                    "average instead; new: neither.", ""]


def _diversity(r: dict) -> list[str]:
    dv = r.get("diversity")
    if not dv:
        return []
    zoo = dv.get("zoo_same_set_disagreement")
    lines = ["## Diversity and multi-step sampling", "",
             f"{dv['tasks']} {SPLIT_TITLES.get(dv['split'], dv['split'])} tasks, {dv['samples']} samples each ({dv['sampler']}, "
             f"guidance {dv['guidance']}, strength {dv.get('strength', 1.0)}). Mean model (1 step): **{dv['mean_model']['acc']:.4f}**. "
             f"Disagreement between two training runs of the same class set: {_num(zoo, '.4f')}.", "",
             "| steps | single sample | − mean model [95% interval] | pairwise disagreement | ensemble of samples | − mean model [95% interval] |",
             "|---|---|---|---|---|---|"]
    for st, v in dv["by_steps"].items():
        lines.append(f"| {st} | {v['single_acc']:.4f} ± {v['single_acc_std_samples']:.4f} | {v['single_minus_mean_model']:+.4f}"
                     f"{_ci(v.get('single_minus_mean_model_ci'))} | {v['disagreement']:.4f} | {v['ensemble_acc']:.4f} | "
                     f"{v['ensemble_minus_mean_model']:+.4f}{_ci(v.get('ensemble_minus_mean_model_ci'))} |")
    return lines + [""]


def _ci(ci: list | None) -> str:
    """' [lo, hi]' of an interval (results from before intervals were recorded have none)."""
    return f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""


def _hypernet_and_sizes(r: dict) -> list[str]:
    lines = []
    h = r.get("hypernet")
    if h:
        lines += ["## Hypernetwork baseline", "",
                  f"Deterministic text → residual weights network (evaluation/hypernet.py), {h['parameters']:,} parameters, "
                  f"trained {h['steps']} steps x {h['batch_size']} models ({h['source']}'s budget) on the same zoo with the "
                  f"generator's augmentations, final loss {h['final_loss']:.4f}, {h['seconds']} s; one forward pass per model.", ""]
    if r.get("sizes"):
        lines += ["## Zero-shot classifier vs generated model: parameters", "", "| k | generated model | projector + k class embeddings |",
                  "|---|---|---|"]
        lines += [f"| {z['k']} | {z['generated_model']:,} | {z.get('zeroshot', 0):,} |" for z in r["sizes"]] + [""]
    return lines


def write_plots(r: dict, out: Path) -> list[str]:
    """accuracy_by_split.png, prompt_forms.png, accuracy_vs_k.png and (if run) finetune_budget.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    splits = list(r["splits"])
    titles = [SPLIT_TITLES.get(s, s) for s in splits]

    # methods side by side per split
    methods = [(b, lambda s, b=b: r["splits"][s]["baselines"].get(b)) for b in r["baselines"]]
    methods.insert(1 if "oracle" in r["baselines"] else 0, ("generated", lambda s: r["splits"][s]["generated"]["names"]))
    methods += [(f, lambda s, f=f: r["splits"][s]["generated"].get(f)) for f in HURTING_FORMS if f in r["forms"]]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(splits) + 2), 4))
    w = 0.8 / len(methods)
    for j, (name, get) in enumerate(methods):
        vals = [get(s) or {"mean": np.nan, "std_tasks": 0} for s in splits]
        ax.bar(np.arange(len(splits)) + (j - (len(methods) - 1) / 2) * w, [v["mean"] for v in vals], w,
               yerr=[v["std_tasks"] for v in vals], capsize=2, label=name)
    ax.set_xticks(np.arange(len(splits)), titles)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("generated models vs baselines")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_split.png", dpi=120)
    plt.close(fig)
    written.append("accuracy_by_split.png")

    # prompt forms (error bars: std over seeds)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(r["forms"]) * len(splits) + 2), 4))
    w = 0.8 / len(splits)
    for j, s in enumerate(splits):
        vals = [r["splits"][s]["generated"][f] for f in r["forms"]]
        ax.bar(np.arange(len(r["forms"])) + (j - (len(splits) - 1) / 2) * w, [v["mean"] for v in vals], w,
               yerr=[v["std_seeds"] for v in vals], capsize=2, label=SPLIT_TITLES.get(s, s))
    ax.set_xticks(np.arange(len(r["forms"])), r["forms"], rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("prompt forms (error bars: std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "prompt_forms.png", dpi=120)
    plt.close(fig)
    written.append("prompt_forms.png")

    # accuracy vs k
    fig, axes = plt.subplots(1, len(splits), figsize=(4 * len(splits), 3.5), squeeze=False, sharey=True)
    for ax, s, title in zip(axes[0], splits, titles):
        by_k = r["splits"][s]["by_k"]
        ks = [int(k) for k in by_k]
        for name in ["generated", *r["baselines"], "chance"]:
            ax.plot(ks, [by_k[str(k)][name] for k in ks], "o-" if name != "chance" else "k--", label=name, ms=3)
        ax.set_title(title)
        ax.set_xlabel("k (classes)")
        ax.set_xticks(ks)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_k.png", dpi=120)
    plt.close(fig)
    written.append("accuracy_vs_k.png")

    fb = r.get("finetune_budget")
    if fb and fb["per_task"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for j, c in enumerate(fb["per_task"]):
            line = ax.plot([max(s, 0.5) for s in c["steps"]], c["acc"], "-", alpha=0.7)[0]
            ax.axhline(c["target_acc"], color=line.get_color(), ls=":", alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps from classifier selection (0 drawn at 0.5)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"fine-tuning budget: median {fb['median_steps_text']} steps (dotted: generated)")
        fig.tight_layout()
        fig.savefig(out / "finetune_budget.png", dpi=120)
        plt.close(fig)
        written.append("finetune_budget.png")
    return written


