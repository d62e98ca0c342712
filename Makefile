# The commands people type. Each one first makes sure .venv exists and matches
# requirements.txt, so on a fresh machine each is a single command.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: grade check test watch list hint reset solution gradebook broker notebook clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@$(PY) -m labkit snapshot
	@touch $(STAMP)

## grade: grade your lessons (LESSON=03 for one lesson, ARGS=-v for full output)
grade: $(STAMP)
	@$(PY) -m labkit grade $(if $(LESSON),--lesson $(LESSON)) $(ARGS)

## watch: grade the current lesson on every save (POLL=1 for WSL/network drives)
watch: $(STAMP)
	@$(PY) -m labkit watch $(if $(POLL),--poll) $(ARGS)

## list: every lesson's status, as last graded
list: $(STAMP)
	@$(PY) -m labkit list

## hint / reset / solution: LESSON=01
hint reset solution: $(STAMP)
	@test -n "$(LESSON)" || { echo "Say which lesson: make $@ LESSON=01"; exit 2; }
	@$(PY) -m labkit $@ $(LESSON) $(ARGS)

## gradebook: grade a folder of submissions (SUBMISSIONS=path, ARGS for more options)
gradebook: $(STAMP)
	@test -n "$(SUBMISSIONS)" || { echo "Say where: make gradebook SUBMISSIONS=path/to/submissions"; exit 2; }
	@$(PY) -m labkit gradebook $(SUBMISSIONS) $(ARGS)

## check: the course's static lint, in a second
check: $(STAMP)
	@$(PY) -m labkit check

## test: the course's own suite (the lint, then harness, solutions, starter check, notebooks)
test: $(STAMP)
	$(PY) -m labkit check
	$(PY) -m pytest tests/labkit $(ARGS)

## broker: run the embedded broker in this terminal until Ctrl-C
broker: $(STAMP)
	@$(PY) -m labkit broker

## notebook: open the lesson notebooks in JupyterLab
notebook: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache
