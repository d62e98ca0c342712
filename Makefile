# The commands people type. Each one first makes sure .venv exists and matches
# requirements.txt, so on a fresh machine each is a single command.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: grade test broker notebook clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

## grade: grade your lessons (LESSON=03 for one lesson, ARGS=-v for full output)
grade: $(STAMP)
	@$(PY) -m labkit grade $(if $(LESSON),--lesson $(LESSON)) $(ARGS)

## test: the course's own suite (harness, solutions, starter check, notebooks)
test: $(STAMP)
	$(PY) -m pytest tests/labkit $(ARGS)

## broker: run the embedded broker in this terminal until Ctrl-C
broker: $(STAMP)
	@$(PY) -m labkit broker

## notebook: open the lesson notebooks in JupyterLab
notebook: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache
