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

# The browser test drives Debian's Chromium (headless) through Playwright.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver

test: lint $(CHROMIUM)  ## ruff + mypy --strict + the whole suite (installs Chromium if missing)
	AVATARKIT_BROWSER_TESTS=required $(BIN)/pytest -q

bench: $(STAMP)  ## benchmarks; results go to docs/performance.md
	$(BIN)/python benchmarks/send_audio.py --write
	$(BIN)/python benchmarks/lite_engine.py --write
	$(BIN)/python benchmarks/offline_render.py --write
	$(BIN)/python benchmarks/whep_first_frame.py --write
	$(BIN)/python benchmarks/musetalk_throughput.py --size ci --write
