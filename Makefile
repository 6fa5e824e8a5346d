# Two commands do all set-up on a fresh machine:
#   make demo   runs the main job
#   make test   runs the test suite (with VNPAGER_DEBUG=1 invariant checks)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests drive: FUSE, and real programs to run on a mount;
# the object stores' real servers (vnpager.tools.objstore): a one-node Ceph
# cluster with RADOS Gateway, and nginx
DEBS := fuse3 libfuse3-dev pkg-config sqlite3 fio \
	ceph-mon ceph-mgr ceph-osd ceph-common radosgw nginx

.PHONY: demo test lint typecheck cover sysdeps bench-deps clean

$(STAMP): pyproject.toml | sysdeps
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

sysdeps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing (run as root, or: sudo apt-get install$$missing)"; fi; \
	fi

# vnpager bench --mount runs dbench and compares with rclone mount: for the benchmark only, not the tests
bench-deps:
	$(MAKE) sysdeps DEBS="$(DEBS) rclone dbench"

demo: $(STAMP)
	$(BIN)/vnpager demo

test: sysdeps $(STAMP)
	VNPAGER_DEBUG=1 $(BIN)/pytest

cover: sysdeps $(STAMP)
	VNPAGER_DEBUG=1 $(BIN)/pytest --cov=vnpager --cov-branch --cov-report=term-missing

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .coverage
