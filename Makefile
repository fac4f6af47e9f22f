# Two entry points for newcomers: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV) test
	touch $@

demo: setup
	$(VENV)/bin/revgan-med demo --output $(DEMO_DIR)

test: setup
	$(VENV)/bin/ruff check revgan_med tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache

# The Docker image (needs a Docker engine) and its lint (does not: hadolint ships in the test extra).
.PHONY: docker docker-lint
docker:
	docker build -f docker/Dockerfile -t revgan-med .

docker-lint: setup
	$(VENV)/bin/hadolint docker/Dockerfile
