# her2_kedro: `make run` (set-up + the main job on the synthetic cohort), `make test` (set-up + tests).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch from the local wheels of this machine kind (a CUDA build that runs on CPU); override on other hosts
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Kedro telemetry would try the network; it is also refused in .telemetry
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export MPLBACKEND := Agg

.PHONY: setup run test lint synthetic ingestion preprocessing intensity features mil resnet clam reporting bench-study viz mlflow-ui benchmark gpu-benchmark clean-data

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or pass PYTHON=..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	# histomicstk 1.4.0 declares large-image[sources], which drags in GDAL, mapnik and bio-formats:
	# they have no wheels on PyPI and fail to build. histomicstk imports fine with large-image core
	# and these few packages, so install it without its declared dependencies.
	$(BIN)/pip install --quiet large-image shapely ctk-cli girder-slicer-cli-web
	$(BIN)/pip install --quiet --no-deps histomicstk==1.4.0
	$(BIN)/pip install --quiet -e ".[dev,deploy]"
	@echo "(pip's notes that histomicstk lacks pyvips, opencv, dask, ... are expected: see the comment above)"
	touch $@

# the demo cohort, every study (intensity, encoder + embedding cache, mil, resnet, clam), then
# the report of them all (data/08_reporting/report.html)
run: setup
	$(BIN)/kedro run --pipelines=synthetic
	$(BIN)/kedro run --pipelines=all
	$(BIN)/kedro run --pipelines=reporting
	@echo "Report: $(CURDIR)/data/08_reporting/report.html"

synthetic: setup
	$(BIN)/kedro run --pipelines=synthetic

ingestion: setup
	$(BIN)/kedro run --pipelines=ingestion

preprocessing: setup
	$(BIN)/kedro run --pipelines=preprocessing

intensity: setup
	$(BIN)/kedro run --pipelines=intensity

features mil resnet clam reporting: setup
	$(BIN)/kedro run --pipelines=$@

# the comparison cohort (conf/bench: ~300 patients, no slides) and every study on it
bench-study: setup
	$(BIN)/kedro run --env=bench --pipelines=synthetic
	$(BIN)/kedro run --env=bench --pipelines=all
	$(BIN)/kedro run --env=bench --pipelines=reporting

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

viz: setup
	$(BIN)/kedro viz run --host 127.0.0.1 --no-browser

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

benchmark: setup
	$(BIN)/python benchmarks/ingestion_benchmark.py
	$(BIN)/python benchmarks/dearray_accuracy.py
	$(BIN)/python benchmarks/deconvolution_benchmark.py
	$(BIN)/python benchmarks/strict_jpeg_overhead.py
	$(BIN)/python benchmarks/preprocessing_benchmark.py
	$(BIN)/python benchmarks/synthetic_calibration.py
	$(BIN)/python benchmarks/model_throughput.py
	$(BIN)/python benchmarks/distributed_equivalence.py

# every GPU measurement and CUDA smoke check, in a few minutes (on a machine with a CUDA GPU)
gpu-benchmark: setup
	$(BIN)/python benchmarks/gpu_benchmark.py

clean-data:
	find data -type f ! -name .gitkeep -delete
	find data -mindepth 2 -type d -empty -delete
