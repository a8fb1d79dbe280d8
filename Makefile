# The two commands of the README:  `make demo`  and  `make test`.
# Both create ./.venv (once) and install the project into it with torch pinned to the local CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[plot,test]"
	touch $@

# Main job on the embedded default: the whole pipeline (spectral analysis, IMP mask, spectral fine-tuning
# of a DeepLabV3-style OVS model with the mask, zero-shot evaluation) with a random small CLIP.
demo: install
	$(BIN)/opentrans-hf demo --output_dir runs/demo

test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_spectral.py

clean:
	rm -rf $(VENV) runs build *.egg-info
