# lorakit: `make demo` and `make test` install into .venv at the lock's versions (lorakit/lock.txt) when needed,
# then run; the venv is reinstalled whenever the lock, pyproject.toml or the install script changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lock demo test smoke bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh lorakit/lock.txt
	bash scripts/install.sh $(VENV) $(PYTHON)
	touch $(STAMP)

# Newest allowed versions into a throwaway venv; the lock is rewritten only if the whole suite passes there.
lock:
	$(PYTHON) scripts/lock.py

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

smoke: $(STAMP)
	$(PY) scripts/smoke.py

bench: $(STAMP)
	$(PY) scripts/bench_cli.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_quality.py
	$(PY) scripts/bench_data.py

clean:
	rm -rf $(VENV) runs/demo runs/smoke
