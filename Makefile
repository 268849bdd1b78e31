# lorakit: `make demo` and `make test` install into .venv when needed, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test smoke bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) $(PYTHON)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

smoke: $(STAMP)
	$(PY) scripts/smoke.py

bench: $(STAMP)
	$(PY) scripts/bench_cli.py
	$(PY) scripts/bench_train.py

clean:
	rm -rf $(VENV) runs/demo runs/smoke
