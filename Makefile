# Two commands for a fresh machine with only Python 3.11:
#   make demo   convert + benchmark the bundled nuScenes CenterPoint-PointPillars
#   make test   run the test suite
#   make gate   latency and fidelity regression gate against benchmarks/baselines/
# Both create .venv and install what they need (torch pinned to the CPU wheel).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= centerpoint_pillar_nus

.PHONY: demo test gate bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The tests compare deploykit's nuScenes readers and metrics with nuscenes-devkit. Its
	# wheel pins numpy<2, which it does not need for what is used here: install it without
	# its pins, with the modules those parts import.
	$(PY) -m pip install --quiet --no-deps nuscenes-devkit==1.2.0
	$(PY) -m pip install --quiet pyquaternion tqdm cachetools shapely scikit-learn opencv-python-headless
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deploykit convert --recipe $(DEMO) --out build/demo/$(DEMO) --overwrite
	$(VENV)/bin/deploykit bench build/demo/$(DEMO)/model.onnx --warmup 3 --iterations 20 \
		--json build/demo/$(DEMO)/bench.json
	@echo "--- data in, detections out: the trained synthetic-LiDAR CenterPoint on a nuScenes-layout dataset"
	$(VENV)/bin/deploykit sample-dataset --out build/demo/nuscenes --no-cameras --overwrite
	$(VENV)/bin/deploykit convert --recipe centerpoint_pillar_synth --out build/demo/synth --overwrite -q
	$(VENV)/bin/deploykit detect build/demo/synth --inputs build/demo/nuscenes --out build/demo/detect --overwrite
	@echo "pictures: build/demo/detect/bev/*.png, metrics: build/demo/detect/metrics.md"

test: $(STAMP)
	$(PY) -m pytest -q

# Gate this checkout's small models against benchmarks/baselines/ (exit 10 on a regression).
gate: $(STAMP)
	$(PY) benchmarks/ci_gate.py

bench: $(STAMP)
	$(PY) benchmarks/bench_lidar_rewrites.py
	$(PY) benchmarks/bench_msda.py
	$(PY) benchmarks/bench_bevformer.py
	$(PY) benchmarks/bench_bevfusion.py
	$(PY) benchmarks/bench_bev_pool.py
	$(PY) benchmarks/bench_deform_conv.py
	$(PY) benchmarks/bench_bevdepth.py
	$(PY) benchmarks/bench_normalise_points.py
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_tool.py
	$(PY) benchmarks/noise_floor.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf build .cache
