# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU machines (and CI): the torch/torchvision pair that lies on this machine's disk. A torch that
# is already in .venv (a user's own CUDA build) is never replaced. The default wheels are CUDA 13
# builds (NVIDIA driver >= 580); for a CUDA 12 driver (R535-R570) take the wheels of that index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cu126 TORCH_PKGS="torch torchvision" install
TORCH_PKGS  ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed
SAMPLE := shards/sample

.PHONY: install demo test bench gpu-check clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -c 'import torch' 2>/dev/null || \
	    $(if $(strip $(TORCH_PKGS)),$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PKGS),true)
	@# the installed torch pair pins the rest: no dependency may pull another torch over it
	$(BIN)/pip freeze | grep -iE '^(torch|torchvision)==' > $(VENV)/torch-pins.txt || true
	$(BIN)/pip install -c $(VENV)/torch-pins.txt -e '.[test,viz]'
	@# DALI wheels are per CUDA major; take the one matching the installed torch
	$(BIN)/pip install "nvidia-dali-cuda$$($(BIN)/python -c 'import torch; print((torch.version.cuda or "13").split(".")[0])')0"
	touch $@

demo: $(STAMP)
	$(BIN)/mimpipe demo --shards $(SAMPLE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/mimpipe bench

# The GPU check runs where only torch + timm + msgpack are installed and mimpipe is not: no pip
# install (that box reaches no registry). pyproject maps mimpipe.pipeline -> pipeline/ etc., so a
# folder build/gpu-check-path/mimpipe/ of symlinks to the repository's folders is the package, and
# the check runs from inside it (the repository root would shadow it with its bare mimpipe/).
# Options: make gpu-check GPU_CHECK_ARGS='--device cpu --model mae_vit_micro_patch8_64 --small'
GPU_PY   := $(if $(wildcard $(BIN)/python),$(CURDIR)/$(BIN)/python,python3)
GPU_PATH ?= build/gpu-check-path
gpu-check:
	rm -rf $(GPU_PATH) && mkdir -p $(GPU_PATH)/mimpipe
	ln -s $(CURDIR)/mimpipe/__init__.py $(GPU_PATH)/mimpipe/__init__.py
	for d in pipeline maskserver train tools; do ln -s $(CURDIR)/$$d $(GPU_PATH)/mimpipe/$$d; done
	cd $(GPU_PATH) && $(GPU_PY) -m mimpipe.tools.gpu_check \
	    --out "$${OUT:-$(CURDIR)/runs}/gpu-check.json" $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(SAMPLE) runs
