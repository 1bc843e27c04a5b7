# Tina: the two commands a new user needs are `make setup` and `make test` (see README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
APT_PACKAGES := dataset-fashion-mnist openclipart-png wordnet-base gcc
TEST_APT_PACKAGES := chromium
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-dev apt test test-all zoo train checkpoint eval bench demo

# Debian packages with the offline datasets. Installed when we are root and apt-get exists;
# otherwise we say what to install (the package still runs `tina generate` without them).
apt:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		missing=""; for p in $(APT_PACKAGES) $(EXTRA_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi; \
	else \
		echo "note: not root or no apt-get; for the datasets install: sudo apt-get install $(APT_PACKAGES) $(EXTRA_APT)"; \
		echo "      (or point Tina at your own copies with dataset.root=PATH / TINA_FASHION_MNIST / TINA_CLIPART)"; \
	fi

# Everything the README uses (training, evaluation, CLIP encoders, the demo); `pip install .` alone is the
# lean runtime (tina generate / predict / info and the Python API).
setup: apt
	$(PIP) install -e ".[all]"

setup-dev:
	$(MAKE) apt EXTRA_APT="$(TEST_APT_PACKAGES)"
	$(PIP) install -e ".[dev]"

# The default suite: CPU only, a few minutes. Slow and GPU tests: make test-all.
test: setup-dev
	$(PYTHON) -m pytest -m "not slow and not gpu" -q

test-all: setup-dev
	$(PYTHON) -m pytest -q

# The full pipeline behind the shipped fashion-mnist checkpoint (alias default; see checkpoints.md).
zoo:
	tina zoo build configs/zoo/fashion_mnist.yaml
# Two stages: the diffusion loss alone, then 1,000 steps with the task loss added (tina/training/task_loss.py).
train:
	tina train configs/train/fashion_mnist.yaml
	tina train configs/train/fashion_mnist.yaml init_from=runs/fashion_mnist/bundle out=runs/fashion_mnist_task \
		task_loss.weight=3 trainer.max_steps=1000 optim.lr=2e-4 optim.warmup_steps=50 trainer.val_every=250 trainer.ckpt_every=250
checkpoint: zoo train
	$(PYTHON) -m tina.training.projector runs/fashion_mnist_task/bundle
	$(PYTHON) -m tina.bundle runs/fashion_mnist_task/bundle tina/checkpoints/fashion-mnist --half
	nice -n 15 $(PYTHON) -m evaluation.calibrate fashion-mnist --zoo-config configs/zoo/fashion_mnist.yaml
eval:
	tina eval configs/eval/fashion_mnist.yaml --checkpoint default
bench:
	$(PYTHON) -m benchmarks --json outputs/benchmarks.json
demo:
	tina demo
