# `make repro`: set up .venv (if missing or stale) and run the pipeline; `make test`: set up and run the tests.
# The lock file pins every version this project was tested with; torch comes from pip (not uv/poetry).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# dvc.yaml's stages run `python -m stages.<name>`: that `python` must be the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1


.PHONY: repro-curve repro-deploy repro-detection repro-segmentation repro-full repro-text textdata browser bad-inputs-doc faults gpu-check postgres tracking-server tracking-server-stop
.PHONY: setup repro test test-fast lint format dataset clean-outputs bench bench-scaling review

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	$(VENV)/bin/dvc config core.analytics false
	touch $(STAMP)

# The default target dataset: Debian's package (offline). Other datasets need nothing here.
dataset:
	@if [ -f $(FASHION) ] || ! grep -qE '^\s*dataset:\s*fashion_mnist' params.yaml; then exit 0; fi; \
	echo "installing Debian's dataset-fashion-mnist (the default target data)"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get install -y -q dataset-fashion-mnist || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; } \
	|| { echo "could not install dataset-fashion-mnist: set data.path in params.yaml, or data.allow_download: true"; exit 1; }

repro: setup dataset
	$(VENV)/bin/dvc repro

# The label-budget sweep (curve/pipeline.yaml, put in place as the untracked curve/dvc.yaml: until then DVC
# sees no sweep, so `dvc status` of the default run stays clean; README "Label budgets"): every strategy of curve.strategies and the
# classical baseline at each curve.labels_per_class, then the fits and answers (metrics/curve.json,
# plots/curve.png, reports/curve.md). Runs the root stages it needs first; a plain `make repro` never runs it.
repro-curve: setup dataset
	cp curve/pipeline.yaml curve/dvc.yaml
	$(VENV)/bin/dvc repro curve/dvc.yaml

# The deployment study (deploy/pipeline.yaml, put in place as the untracked deploy/dvc.yaml, like the sweep;
# README "Deployment shift"): deployment images (deploy.data: the built-in corrupted held-out images, or a folder),
# DANN trained on them without labels, then shift, label-free accuracy estimates, AdaBN and DANN before/after
# (metrics/deployment.json, reports/deployment.md). Runs the root stages it needs first.
repro-deploy: setup dataset
	cp deploy/pipeline.yaml deploy/dvc.yaml
	$(VENV)/bin/dvc repro deploy/dvc.yaml

# The dense tasks (detection/pipeline.yaml, put in place as the untracked detection/dvc.yaml, like the sweep):
# every strategy of dense.strategies trained for dense.task, evaluated on test images (COCO mAP or IoU), compared
# with scratch (metrics/dense/<task>/summary.json, reports/dense_<task>.md, plots/dense_<task>.png). README
# "Detection and segmentation". repro-segmentation sets dense.task=segmentation through `dvc exp run -S`, which
# writes it into params.yaml (`git checkout params.yaml` returns to detection).
repro-detection: setup dataset
	cp detection/pipeline.yaml detection/dvc.yaml
	$(VENV)/bin/dvc repro detection/dvc.yaml

repro-segmentation: setup dataset
	cp detection/pipeline.yaml detection/dvc.yaml
	$(VENV)/bin/dvc exp run -S dense.task=segmentation detection/dvc.yaml

# The full profile: everything the default leaves out to stay under 15 minutes on 2 CPU cores (64 px,
# 100 labels per class, 3 seeds, every registered strategy, a converged fine-tune as a second ground
# truth of the agreement). Hours on a CPU. `dvc exp run` writes these values into params.yaml
# (`git checkout params.yaml` returns to the default).
FULL_PROFILE := -S data.image_size=64 -S data.train_per_class=100 -S 'train.seeds=[0,1,2]' \
	-S agreement.finetune_epochs=60 -S '++strategies.gradual_unfreeze={}' -S '++strategies.discriminative_lr={}' -S '++strategies.l2sp={}' \
	-S '++strategies.adabn={}' -S '++strategies.distill={}' -S '++strategies.progressive={}'
repro-full: setup dataset
	$(VENV)/bin/dvc exp run $(FULL_PROFILE)

# The text case study (profiles/text.yaml): tweets and MiniLM come from wheels (setup); the general-English
# reference corpus of the text domain-shift check is Debian's `fortunes`.
textdata:
	@test -f /usr/share/games/fortunes/literature && exit 0; \
	echo "installing Debian's fortunes (general-English reference corpus of the text checks)"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get install -y -q fortunes || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q fortunes; }

# The text case study, offline: copies profiles/text.yaml over params.yaml and runs the same stages
# (`git checkout -- params.yaml dvc.lock metrics plots && dvc checkout` returns to the image default).
repro-text: setup textdata
	cp profiles/text.yaml params.yaml
	$(VENV)/bin/dvc repro

# docs/faults.md: kill -9 inside each kind of stage of the tiny project, recover, compare (minutes).
faults: setup
	$(PY) tests/faults.py --out docs/faults.md

# GPU acceptance on a machine with an NVIDIA GPU (exit 2 without one, before any set-up): the tiny
# pipeline with train.device: cuda, then the img/s table (benchmarks/README.md, GPU). The script runs
# `make setup` itself. GPU_CHECK=pipeline | throughput for one half; the text path:
# `.venv/bin/python tests/gpu/gpu_text_check.py out.json`.
GPU_CHECK ?= all
gpu-check:
	bash tests/gpu/gpu_check.sh $(GPU_CHECK)

# docs/bad_inputs.md: the message each bad input gets, written by the cases the tests check.
bad-inputs-doc: setup
	$(PY) tests/test_bad_inputs.py docs/bad_inputs.md

# Debian's Chromium: the report is checked in a real (headless) browser by the tests.
browser:
	@command -v chromium >/dev/null && exit 0; \
	echo "installing Debian's chromium (headless report check in the tests)"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get install -y -q chromium || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

# Debian's PostgreSQL: the multi-user tracking server's database and Optuna's storage for many machines
# (docs/tracking_server.md); tests/test_tracking_server.py starts a throw-away cluster of its own.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0; \
	echo "installing Debian's postgresql (tracking server database, Optuna storage)"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get install -y -q postgresql || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q postgresql; }

# PostgreSQL + an MLflow tracking server on it, state in .tracking/ (prints the URIs to use); see
# scripts/tracking_server.sh --help for ports and folders.
tracking-server: setup postgres
	scripts/tracking_server.sh start

tracking-server-stop:
	scripts/tracking_server.sh stop

test: setup dataset browser textdata postgres
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# ruff, then the import-linter contracts of pyproject.toml ([tool.importlinter]: the layers of
# docs/architecture.md; a lower package never imports a higher one).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# One table: per-stage fixed overhead, time to a params error, training img/s, scoring cost ratio (~5 min).
# More repeats: make bench BENCH_ARGS="--repeats 5 --steps 20".
bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# Time and peak RSS of prepare / features / score / one training epoch as the training images grow
# (250..16,000) and as the candidates grow (1..10); each point in a fresh temp dir (~30 min, 20-40, on an
# idle 2-core machine). A check: make bench-scaling SCALING_ARGS=--quick
bench-scaling: setup dataset
	$(PY) benchmarks/scaling.py $(SCALING_ARGS)

# What CI posts on a pull request (.github/workflows/review.yml), locally: the working tree against BASE.
# make review BASE=origin/main REVIEW_ARGS="--md --fail-on-regression"
BASE ?= main
review: setup
	$(VENV)/bin/transferlab review --base $(BASE) $(REVIEW_ARGS)
