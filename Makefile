# The two commands of the README:  `make demo`  and  `make test`.
# Both create ./.venv (once) and install the project into it with torch pinned to the local CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-lowest bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[plot,test]"
	touch $@

# Main job on the embedded default: the whole pipeline (spectral analysis, IMP mask, spectral fine-tuning
# of a DeepLabV3-style OVS model with the mask, zero-shot evaluation) with a random small CLIP.
demo: install
	$(BIN)/opentrans-hf demo --output_dir runs/demo --overwrite_output_dir

test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

# The tests on the lowest dependency versions pyproject.toml allows (constraints/lowest.txt), in a venv of their
# own: every test of the library's layers that is not marked slow (about 5 minutes on 2 cores). Not part of
# `make test` / CI.
LOWEST_VENV ?= .venv-lowest
# Two tests are left out: their setup writes an empty split with an Image column (save_to_disk, to_parquet),
# which datasets < 5.2 cannot do (ZeroDivisionError in Dataset._estimate_nbytes); `make test` runs both.
LOWEST_TESTS ?= tests/test_packaging.py tests/utils tests/spectral tests/data tests/embedded tests/methods \
	tests/models tests/training tests/pipelines \
	--deselect tests/data/test_datasets_and_class_names.py::test_empty_dataset_or_split_is_an_error \
	--deselect tests/data/test_hub_copy.py::test_unhappy_paths_name_the_folder_and_what_is_there

$(LOWEST_VENV)/.installed: pyproject.toml constraints/lowest.txt
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install -q -c constraints/lowest.txt "$(TORCH)" -e ".[test]"
	touch $@

test-lowest: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|accelerate|datasets|huggingface.hub|numpy|pillow)=='
	$(LOWEST_VENV)/bin/python -m pytest -q -m "not slow" $(LOWEST_TESTS)

bench: install
	$(BIN)/python scripts/bench_spectral.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) runs build *.egg-info
