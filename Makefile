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

# Main job on the embedded default: spectral analysis of a random-initialised CLIP ViT-B/16 vision tower.
demo: install
	$(BIN)/opentrans-hf analyze vit-b16 --out runs/demo/spectral_report.json --plot runs/demo/alpha.png

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_spectral.py

clean:
	rm -rf $(VENV) runs build *.egg-info
