#!/bin/bash
# The H100 numbers in README.md / checkpoints.md, as one script for a bare GPU machine with torch,
# lightning, timm and sentence-transformers but no network (the workplace's lent GPU):
#
#   bash benchmarks/gpu_session.sh [setup] [tests] [bench] [zoo] [train] [pack]   (default: all but pack)
#
# Carry with the repository:
#   .whl/   wheels of what the machine lacks (diffusers, webdataset, omegaconf, antlr4-python3-runtime,
#           braceexpand, importlib_metadata; `pip download --no-deps --only-binary=:all: ...`)
#   .gpu/fm/    the four Fashion-MNIST IDX .gz files (Debian's /usr/share/datasets/fashion-mnist)
#   .gpu/seed/  generic.safetensors, generic.json, vocab.safetensors of a zoo built here with the same
#           config: the MiniLM text encoder (an 84 MB wheel) stays on this side, and the zoo builder
#           reuses a generic model and vocabulary it finds in the zoo folder.
# Results go to $OUT (the device tool's output folder).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TINA_FASHION_MNIST=$PWD/.gpu/fm
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-setup tests bench zoo train}

setup() {
  if [ ! -f /tmp/site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    touch /tmp/site/.done
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
}
zoo() {  # the default zoo (configs/zoo/fashion_mnist.yaml): 8,180 models x 400 steps, ~100 s on an H100
  mkdir -p zoos/fashion_mnist
  for f in generic.safetensors generic.json vocab.safetensors; do
    [ -f zoos/fashion_mnist/$f ] || cp .gpu/seed/$f zoos/fashion_mnist/
  done
  ( time python3 -m zoo_builder build configs/zoo/fashion_mnist.yaml runtime.device=cuda ) > "$OUT/zoo.log" 2>&1
  grep -E "^zoo |^real" "$OUT/zoo.log"
}
train() {  # the default generator (configs/train/fashion_mnist.yaml): ~3 min on an H100
  ( time python3 -m tina train configs/train/fashion_mnist.yaml trainer.workers=12 ) > "$OUT/train.log" 2>&1
  python3 -m tina.bundle runs/fashion_mnist/bundle runs/fashion_mnist/bundle_half --half >> "$OUT/train.log" 2>&1
  cp runs/fashion_mnist/logs/version_0/metrics.csv "$OUT/" 2>/dev/null
  grep -E "final held-out|^real|bundle_half" "$OUT/train.log"
}
for step in setup $steps; do
  export PYTHONPATH=/tmp/site:$PWD
  case $step in
    setup) setup ;;
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 ;;
    bench) timeout 300 python3 -m benchmarks.zoo_throughput --device cuda --repeats 1 --models 8192 --group-size 2048 \
             --json "$OUT/zoo_throughput_h100.json" | grep -v "^{" ;;
    zoo) zoo ;;
    train) train ;;
    pack) tar cf "$OUT/bundle.tar" -C runs/fashion_mnist bundle_half && ls -la "$OUT" ;;
    *) echo "unknown step $step (setup tests bench zoo train pack)"; exit 2 ;;
  esac
done
