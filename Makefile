# Set-up and the two commands from the README. Only Python 3.11, pip and make are assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/cifar10_cdcgan.yaml
ARGS   ?=
# Where CIFAR-10 comes from when the shards are missing: a torchvision copy (cifar-10-batches-py
# under CIFAR10_ROOT), else the ImageFolder copy in ../shared/data, else a download.
CIFAR10_ROOT ?= data/cifar10
SHARED_CIFAR ?= ../shared/data/cifar10-jpeg.tar.gz
SHARDS ?= data/shards/cifar10-train

.PHONY: setup test train shards clean gpu-bundle

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[test,deepspeed]"
	touch $@

setup: $(STAMP)

# the suite, then its numerics tests again under an AVX2-only CPU's kernels; the last line counts both
test: setup
	$(BIN)/python tests/repeat.py --ci

shards: setup
	$(BIN)/python -m data_shards ensure-cifar10 --out $(SHARDS) --root $(CIFAR10_ROOT) --shared $(SHARED_CIFAR)

train: shards
	$(BIN)/python launch/train.py --config $(CONFIG) --resume auto data.shards=$(SHARDS) $(ARGS)

# local/gpu/: what benchmarks/gpu_check.sh needs on a GPU machine without a registry (docs/benchmarks.md)
gpu-bundle: setup
	SHARED_CIFAR=$(SHARED_CIFAR) PYTHON=$(BIN)/python bash benchmarks/prepare_gpu.sh local/gpu

clean:
	rm -rf $(VENV) *.egg-info
