"""Clip-art recipe search on a val split carved from the TRAINING images (never the test split)."""
import sys, time, json, copy, random
import numpy as np, torch
from dataclasses import replace
from tina.datasets import load_dataset, split_test
from tina.config import load_config
from zoo_builder.config import ZooConfig
from zoo_builder import generic, fit, build
from zoo_builder.tasks import sample_tasks
from tina.layout import layout_for

torch.set_num_threads(2)
ds = load_dataset("clipart")
# hold out ~20% of each class's training images as recipe-val (seeded)
rng = np.random.default_rng(0)
val_mask = np.zeros(len(ds.train_y), bool)
for c in range(len(ds.classes)):
    idx = np.nonzero(ds.train_y == c)[0]
    val_mask[rng.choice(idx, max(5, len(idx) // 5), replace=False)] = True
dv = replace(ds, train_x=ds.train_x[~val_mask], train_y=ds.train_y[~val_mask], test_x=ds.train_x[val_mask], test_y=ds.train_y[val_mask])

def run(gen_over, ft_over, ntasks=36, flip=False, seed=0):
    cfg = load_config(ZooConfig, "/work/main/configs/zoo/clipart.yaml", [f"{k}={v}" for k, v in {**gen_over, **ft_over}.items()])
    layout = layout_for(cfg.target, dv.image, cfg.token_size)
    key = json.dumps(gen_over, sort_keys=True)
    if key not in CACHE:
        net, m = generic.train_generic(cfg, dv, layout.fingerprint)
        CACHE[key] = ({k: v.clone() for k, v in net.state_dict().items()}, m["test_acc"])
    state, gacc = CACHE[key]
    data = build.make_fit_data(cfg, dv, state, None)
    if flip:
        x = data.train
        data.train = torch.cat([x, x.flip(2)])
        n = len(x)
        # rebuild order with both copies
        y = torch.from_numpy(dv.train_y)
        y2 = torch.cat([y, y])
        g = torch.Generator().manual_seed(0)
        data.train_order, data.train_start, data.train_count = fit.class_index(y2, len(dv.classes), 0, g)
    r = random.Random(seed)
    tasks = [r.sample(range(len(dv.classes)), r.randint(2, 32)) for _ in range(ntasks)]
    net = build._fit_net(cfg, dv.image, 0)
    keys = fit.model_keys(0, list(range(ntasks)))
    t0 = time.time()
    res = fit.fit_group(net, state, tasks, keys, data, cfg.finetune, 12)
    o, s = np.mean(res.oracle_acc), np.mean(res.selection_acc)
    print(json.dumps({"gen": gen_over, "ft": ft_over, "flip": flip, "generic_val": round(gacc, 4), "oracle": round(o, 4), "selection": round(s, 4), "gain": round(o - s, 4), "sec": round(time.time() - t0, 1)}), flush=True)

CACHE = {}
if __name__ == "__main__":
    for spec in sys.argv[1:]:
        d = json.loads(spec)
        run(d.get("gen", {}), d.get("ft", {}), d.get("n", 36), d.get("flip", False))
