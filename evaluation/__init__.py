"""Evaluation protocol: generated models against the oracle and honest baselines, on real test images.

    tina eval [CONFIG.yaml] [key=value ...] [--checkpoint B] [--zoo Z] [--out DIR] [--seeds 3] [--tasks N]

For every zoo split (seen combinations "train", "val", "unseen_combo", "unseen_class") and every task (up to
`tasks` per split), models are generated from several prompt forms and several seeds, all of a seed
in a few batched `Tina.generate_tasks` calls, and measured on the task's real test images
(`tina.training.accuracy.task_test_set`). Prompt forms: evaluation/prompts.py; baselines: evaluation/baselines.py;
the fine-tuning budget: evaluation/finetune.py.

One job per file:
  config.py      EvalConfig and the names of forms, baselines and splits
  inputs.py      zoo, checkpoint and dataset, checked (every missing piece says how to get it)
  prompts.py     the per-class conditioning of every prompt form
  baselines.py   selection, retrieval by text, head composition (flat vectors in layout order)
  scoring.py     accuracies of many models of one task at once
  finetune.py    the fine-tuning budget (the zoo builder's recipe)
  statistics.py  summaries over tasks and seeds, paired differences, headlines
  report.py      results.md and plots
  run.py         the protocol (evaluate)
  cli.py         `tina eval`

This package sits beside zoo_builder: it may import tina and zoo_builder; tina never imports it.
Outputs in OUT: results.json (schema RESULTS_FORMAT), results.md (tables), PNG plots, eval_config.yaml.
"""

from evaluation.config import BASELINES, FORMS, EvalConfig, load_eval_config
from evaluation.run import evaluate

__all__ = ["BASELINES", "FORMS", "EvalConfig", "evaluate", "load_eval_config"]
