# Two commands on a fresh machine: `make bench` and `make test`. Each builds its own virtual
# environment, installs the pinned CPU build of torch FIRST (the library itself only asks for
# torch>=2.4, which that build satisfies, so pip never pulls a CUDA build) and then the project
# with the extras it needs. `make lint` checks style, formatting and types.
PY ?= python3
TORCH_PIN := torch==2.13.0
LINT_PATHS := src tests benchmarks examples docs

.PHONY: bench test test-slow lint clean

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

# The reliability suite and the acceptance runs (kill and resume, churn, hostile peers, joins,
# heals): `slow`-marked, out of the default run; CI runs them after `make test`.
test-slow: .venv/ok
	TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -m slow

lint: .venv/ok
	.venv/bin/ruff check $(LINT_PATHS)
	.venv/bin/ruff format --check $(LINT_PATHS)
	.venv/bin/mypy

clean:
	rm -rf .venv .venv-bench
