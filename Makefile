# Two commands for a newcomer: `make demo` and `make test`. Each sets up .venv itself.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline
export PYTHONUNBUFFERED := 1

.PHONY: test demo lint setup clean

setup: $(STAMP)

# torch is pinned exactly: these are the builds our machines hold offline. The project itself is
# installed editable with its test extras (diffusers is a real client in the tests).
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q

lint: $(STAMP)
	$(VPY) -m ruff check .

# A second `make demo` reuses every finished stage; `make demo DEMO_ARGS="--threads 2"` (or "--restart",
# "--images my_photos/") passes options to scripts/demo.py.
DEMO_ARGS ?=
demo: $(STAMP)
	$(VPY) scripts/demo.py --out demo_out $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo_out logs .pytest_cache .ruff_cache
