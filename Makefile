# virtsync: `make demo` runs the main job, `make test` the test suite.
# Both install what they need first (scripts/setup.sh; fast when done).
PY := .venv/bin/python

.PHONY: setup test unit demo bench lint clean

setup:
	@sh scripts/setup.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

unit: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) -m bench

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf .venv build *.egg-info
