# The README's commands. Each target sets up what it needs first
# (tools/bootstrap.sh is idempotent and quick when nothing is missing).

PYTHON := .venv/bin/python
# Extra pytest arguments for a local run, e.g. `make test PYTEST_ARGS='-k outbox -x'`.
PYTEST_ARGS ?=

.PHONY: bootstrap test demo bench

bootstrap:
	bash tools/bootstrap.sh

# The whole test suite (what .ci/run runs).
test: bootstrap
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# A private mosquitto, the HQ receiver and the daemon on simulated devices.
demo: bootstrap
	$(PYTHON) -m agent.testing.demo

# Each bench/*.py prints its JSON result (with its baseline measured in the same run).
bench: bootstrap
	@set -e; found=0; \
	for script in bench/*.py; do \
		[ -e "$$script" ] || continue; found=1; \
		echo "== $$script" >&2; \
		$(PYTHON) "$$script"; \
	done; \
	[ "$$found" = 1 ] || { echo "bench: no bench/*.py scripts" >&2; exit 1; }
