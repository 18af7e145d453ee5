# The two commands of the README. Both create the virtualenv on first use and refresh it
# whenever pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## a talking avatar rendered on this machine -> demo.mp4, verified
	$(BIN)/avatarkit demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

test: lint  ## ruff + mypy --strict + the whole suite
	$(BIN)/pytest -q

bench: $(STAMP)  ## benchmarks; results go to docs/performance.md
	$(BIN)/python benchmarks/send_audio.py --write
