"""Where a grouped cnn-33k training step spends its time: each convolution of G models in the grouped layout
(zoo_builder/grouped.py), forward + backward, float32 and bfloat16, and the rewrites of the first one tried.

    python -m benchmarks.conv_layers [--models 12 --batch 32 --repeats 10] [--json PATH]

The first convolution has one input channel per model, a shape oneDNN runs far below its rate on the others;
it is what keeps cnn-33k's batched trainer under 4x the one-model loop (README, Targets). Rewrites of it:
  depthwise  each model's image repeated once per output channel, then a depthwise convolution
  unfold     3x3 patches (F.unfold) and a per-model einsum
All rows are timed side by side in one run, single-threaded (the zoo builder runs one thread per worker).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks import median

LAYERS = ((1, 16, 28), (16, 32, 14), (32, 64, 7))  # cnn-33k on 28-px images: (in, out channels, size) per model


def _time(fn, repeats: int) -> float:
    """Median seconds of forward + backward."""
    for _ in range(2):
        y = fn()
        y.backward(torch.ones_like(y))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = fn()
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - t0)
    return median(times)


def run(models: int = 12, batch: int = 32, repeats: int = 10) -> dict:
    torch.set_num_threads(1)
    G, B = models, batch
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        bf16 = dtype == torch.bfloat16
        for ci, co, H in LAYERS:
            x = torch.randn(B, G * ci, H, H).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(ci > 1)
            w = (torch.randn(G * co, ci, 3, 3) * 0.1).requires_grad_()  # (G*Co, Ci, 3, 3) float32 master weights
            b = torch.zeros(G * co, requires_grad=True)
            flops = 3 * 2 * B * H * H * co * ci * 9 * G  # forward + backward ~ 3x forward

            def grouped(x=x, w=w, b=b):
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    return F.conv2d(x, w, b, 1, 1, 1, G)  # (B, G*Co, H, W)

            variants = {"grouped": grouped}
            if ci == 1:
                def depthwise(x=x, w=w, b=b, co=co):
                    xr = x.repeat_interleave(co, 1).contiguous(memory_format=torch.channels_last)  # (B, G*Co, H, W)
                    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                        return F.conv2d(xr, w, b, 1, 1, 1, G * co)

                def unfold(x=x, w=w, b=b, co=co, H=H):
                    p = F.unfold(x, 3, padding=1).view(B, G, 9, H * H)  # (B, G, 9, H*W)
                    y = torch.einsum("bgpn,gop->bngo", p, w.view(G, co, 9).to(dtype)) + b.view(G, co).to(dtype)
                    return y.reshape(B, H, H, G * co).permute(0, 3, 1, 2)  # (B, G*Co, H, W) channels-last

                variants |= {"depthwise": depthwise, "unfold": unfold}
            for name, fn in variants.items():
                s = _time(fn, repeats)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "layer": f"{ci}->{co} @{H}px", "variant": name,
                             "ms": round(s * 1e3, 2), "gflops": round(flops / s / 1e9, 1)})
    return {"models": G, "batch": B, "repeats": repeats, "threads": 1, "torch": torch.__version__, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"{res['models']} models x {res['batch']} images, forward + backward, 1 thread, median of {res['repeats']}", "",
             "| dtype | layer | variant | ms | GFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['layer']} | {r['variant']} | {r['ms']} | {r['gflops']} |" for r in res["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conv_layers", description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    res = run(args.models, args.batch, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
