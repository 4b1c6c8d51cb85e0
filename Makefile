# Two entry points; each does its own setup. See README.md.
.PHONY: demo test lint bench

demo:
	@scripts/bootstrap.sh
	@.venv/bin/knexa-lab run --preset embedded

test:
	@scripts/bootstrap.sh test
	@.venv/bin/ruff check .
	@.venv/bin/python -m pytest -q --durations=25 tests

lint:
	@.venv/bin/ruff check .

bench:
	@scripts/bootstrap.sh
	@.venv/bin/python -m benchmarks
