# aicsd: `make demo` runs the main job on built-in synthetic data, `make test` runs every check.
# Both create or update the virtual environment in .venv first, so a newcomer types only one command.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision versions that install quickly on the project's machines; `make install TORCH_PIN=` lets pip choose.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?=
# pytest processes (pytest-xdist; one test file each at a time, as the files' module fixtures build data once)
PYTEST_WORKERS ?= 2
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: install demo demo-quick test export clean-nbs docs-check clean gpu-check gpu-check-compile gpu-wheels

install: $(STAMP)

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(if $(strip $(TORCH_PIN)),$(BIN)/python -m pip install --quiet $(TORCH_PIN))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "installed aicsd into $(VENV) (activate with: source $(BIN)/activate)"

demo: $(STAMP)
	AICSD_MAKE_TARGET=demo $(BIN)/aicsd demo $(DEMO_ARGS)

demo-quick: $(STAMP)
	AICSD_MAKE_TARGET=demo-quick $(BIN)/aicsd demo --quick $(DEMO_ARGS)

# 1. library in sync with notebooks, 2. notebooks clean, 3. notebook tests, 4. pytest, 5. docs processing
test: $(STAMP)
	@echo "== 1/5 nbdev_export: is aicsd/ in sync with nbs/?"
	@before=$$(find aicsd -type f -name '*.py' | LC_ALL=C sort | xargs sha1sum); \
	 $(BIN)/nbdev_export || exit 1; \
	 after=$$(find aicsd -type f -name '*.py' | LC_ALL=C sort | xargs sha1sum); \
	 if [ "$$before" != "$$after" ]; then \
	   echo "FAIL: nbdev_export changed aicsd/: the library was out of sync with the notebooks."; \
	   diff <(echo "$$before") <(echo "$$after"); \
	   echo "Commit the exported files (edit nbs/, never aicsd/ by hand)."; exit 1; fi
	@echo "== 2/5 nbdev_clean: are the notebooks clean?"
	@before=$$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | LC_ALL=C sort | xargs sha1sum); \
	 $(BIN)/nbdev_clean || exit 1; \
	 after=$$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | LC_ALL=C sort | xargs sha1sum); \
	 if [ "$$before" != "$$after" ]; then \
	   echo "FAIL: nbdev_clean changed notebooks: commit them cleaned (or run nbdev_install_hooks)."; \
	   diff <(echo "$$before") <(echo "$$after"); exit 1; fi
	@echo "== 3/5 nbdev_test (cells flagged gpu/data/slow are skipped)"
	@# with a temporary folder of its own, removed afterwards, so that files the notebooks leave there do not pile up
	@t=$$(mktemp -d -t aicsd-nbdev-test.XXXXXX); echo "OMP_NUM_THREADS=1 TMPDIR=$$t $(BIN)/nbdev_test --n_workers 2 --timing"; \
	 OMP_NUM_THREADS=1 TMPDIR=$$t $(BIN)/nbdev_test --n_workers 2 --timing; st=$$?; \
	 n=$$(find "$$t" -type f | wc -l); if [ "$$n" != 0 ]; then echo "FAIL: the notebooks left $$n files ($$(du -sh "$$t" | cut -f1)) in TMPDIR (removed):"; \
	   find "$$t" -type f | head -5; st=1; fi; \
	 rm -rf "$$t"; exit $$st
	@# float32 tolerances hold on every x86 CPU: the numeric notebooks again with torch's kernels for CPUs without
	@# AVX2/AVX-512 (results differ in the last bits by kernel, as they do between AMD and Intel CI machines)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --path nbs --file_glob '0[0-4]_*.ipynb'
	@echo "== 4/5 pytest tests/"
	$(BIN)/python -m pytest tests/ -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=12
	@echo "== 5/5 nbdev_proc_nbs (docs pre-processing; Quarto renders the site in the GitHub docs workflow)"
	@# nbdev_proc_nbs itself first tries to install Quarto with sudo and then pip-installs the project into
	@# whatever pip is on PATH; run the same processing steps without that (Quarto cannot be installed here).
	$(BIN)/python -c "from nbdev.quarto import refresh_quarto_yml; from nbdev.doclinks import _build_modidx; \
	  from nbdev.serve import proc_nbs; from nbdev.config import get_config; \
	  refresh_quarto_yml(); _build_modidx(); proc_nbs(get_config().nbs_path, n_workers=2); print('docs processed into _proc/')"
	@echo "make test: all checks passed"

# On a machine with CUDA GPUs, in two calls of under 10 minutes each on one GPU: `make gpu-check` runs 1. the tests
# flagged `gpu` (tests/test_gpu.py), 2. the GPU self-check (tests/gpu_check.py) of every GPU path at the paper's and the
# field's sizes with its results checked (mixed precision, channels-last, the step of a plain `aicsd distill` against
# the released-style one, evaluation at 1024x2048, the field's DeepLabV3, a field-protocol run through the command
# line, torchrun on every GPU: NCCL and SyncBatchNorm from 2 GPUs, a compiled torchrun run stopped and resumed), as
# tables, then the goals met or missed; `make gpu-check-compile` runs the torch.compile section (about 3 minutes).
# Each exits non-zero on a wrong result. GPU_PY=python3 uses a Python that already has torch (no .venv, nothing
# installed); GPU_ARGS adds options of tests/gpu_check.py, e.g. GPU_ARGS="--out $$OUT/gpu.jsonl --budget-s 400".
# The lent GPU machines have torch but not fastcore, which aicsd imports: `make gpu-wheels` here downloads its wheel
# into .whl/ (ignored by git); carry .whl there, and the GPU targets install it into a temporary folder first.
GPU_PY ?= $(BIN)/python
GPU_ARGS ?=
GPU_SECTIONS ?= losses icsd teacher steps default_step eval latency deeplabv3 field_cli ddp
GPU_SITE := $${TMPDIR:-/tmp}/aicsd-gpu-site
GPU_ENV = export PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}; \
	 if ! $(GPU_PY) -c 'import fastcore' 2>/dev/null; then \
	   if ! ls .whl/fastcore-*.whl >/dev/null 2>&1; then echo "gpu-check: $(GPU_PY) has no fastcore: run make gpu-wheels where pip reaches the package index, and bring .whl/"; exit 2; fi; \
	   $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl || exit 2; \
	   export PYTHONPATH=$$PYTHONPATH:$(GPU_SITE); fi; \
	 $(GPU_PY) -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; rc=$$?; \
	 if [ $$rc = 3 ]; then echo "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False)"; exit 2; \
	 elif [ $$rc != 0 ]; then echo "gpu-check: $(GPU_PY) cannot import torch"; exit 2; fi
gpu-wheels:
	mkdir -p .whl && $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 -d .whl 'fastcore>=1.5,<2' && ls .whl

gpu-check: $(if $(filter $(BIN)/python,$(GPU_PY)),$(STAMP))
	@$(GPU_ENV); st=0; \
	 echo "== 1/2 pytest -m gpu tests/test_gpu.py"; \
	 $(GPU_PY) -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -k 'not gpu_check_quick' || st=1; \
	 echo "== 2/2 tests/gpu_check.py --sections $(GPU_SECTIONS)"; \
	 $(GPU_PY) tests/gpu_check.py --device cuda --sections $(GPU_SECTIONS) $(GPU_ARGS) || st=1; \
	 if [ $$st = 0 ]; then echo "gpu-check: all checks passed (then: make gpu-check-compile)"; else echo "gpu-check: FAILED (see above)"; fi; exit $$st

gpu-check-compile: $(if $(filter $(BIN)/python,$(GPU_PY)),$(STAMP))
	@$(GPU_ENV); $(GPU_PY) tests/gpu_check.py --device cuda --sections compile $(GPU_ARGS)

export: $(STAMP)
	$(BIN)/nbdev_export

clean:
	rm -rf _proc _docs .pytest_cache
