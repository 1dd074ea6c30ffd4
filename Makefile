# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU machines (and CI): the torch/torchvision pair that lies on this machine's disk. GPU users:
# install your CUDA torch into .venv first and run with TORCH_PKGS= to keep it.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
SAMPLE := shards/sample

.PHONY: install demo test bench clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(if $(strip $(TORCH_PKGS)),$(BIN)/pip install $(TORCH_PKGS))
	$(BIN)/pip install -e '.[test,viz]'
	@# DALI wheels are per CUDA major; take the one matching the installed torch
	$(BIN)/pip install "nvidia-dali-cuda$$($(BIN)/python -c 'import torch; print((torch.version.cuda or "13").split(".")[0])')0"
	touch $@

demo: $(STAMP)
	$(BIN)/mimpipe demo --shards $(SAMPLE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/mimpipe bench

clean:
	rm -rf $(VENV) $(SAMPLE) runs
