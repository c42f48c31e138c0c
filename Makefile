# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-torch.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements-torch.txt
	$(BIN)/pip install -e ".[test]"
	touch $@

demo: setup
	$(BIN)/hfsam demo --output demo_output --overwrite

# Lint, format check and type check first (seconds), then the tests on two workers (one core each;
# Testing/conftest.py sets their threads), with the slowest listed.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2 Testing --durations=15

# Benchmarks (not tests): results go to benchmarks/results/, summarised in benchmarks/RESULTS.md.
bench: setup
	$(BIN)/pip install -e ".[bench]"  # MONAI, for the U-Net baseline of bench fewshot
	$(BIN)/hfsam bench fewshot --backbone lite_medsam --jobs 2 -o benchmarks/results
	$(BIN)/hfsam bench speed --backbone lite_medsam -o benchmarks/results
	$(BIN)/hfsam bench speed --checkpoint none --backbone vit_b --img-size 512 -o benchmarks/results

clean:
	rm -rf $(VENV) demo_output .pytest_cache
