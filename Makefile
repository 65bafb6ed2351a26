# Two commands on a fresh machine: `make bench` and `make test`. Each builds its own virtual
# environment, pins the CPU build of torch and installs the project with the extras it needs.
PY ?= python3
TORCH_PIN := torch==2.13.0

.PHONY: bench test lint clean

.venv-bench/ok: pyproject.toml
	$(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q --upgrade pip
	.venv-bench/bin/pip install -q $(TORCH_PIN)
	.venv-bench/bin/pip install -q -e ".[bench]"
	touch $@

.venv/ok: pyproject.toml
	$(PY) -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q $(TORCH_PIN)
	.venv/bin/pip install -q -e ".[dev,triton,hivemind,bench]"
	touch $@

bench: .venv-bench/ok
	.venv-bench/bin/thinwire bench --out bench_out

test: .venv/ok
	TRITON_INTERPRET=1 .venv/bin/python -m pytest -q

lint: .venv/ok
	.venv/bin/ruff check src tests benchmarks examples

clean:
	rm -rf .venv .venv-bench
