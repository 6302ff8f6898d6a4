# `make demo`: install + stage 1 then stage 2 on the embedded demo data.  `make test`: install + the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
# Two CPU ranks under the real deepspeed launcher (gloo); on a GPU box use --num_gpus N.
DS_LAUNCH := DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/deepspeed --num_gpus 2 --master_port $${MASTER_PORT:-29511}

# FFCV builds from source against OpenCV and libturbojpeg found by pkg-config under the name
# `opencv`; Debian names it opencv4, so a link in build/pkgconfig provides the expected name.
PKGCONF := $(CURDIR)/build/pkgconfig

.PHONY: install syslibs slurm demo dense-demo dense-demo-cluttered test clean gpu-wheels

syslibs:
	@if ! pkg-config --exists opencv4 2>/dev/null || ! pkg-config --exists libturbojpeg 2>/dev/null; then \
	  echo "installing FFCV's system libraries (pkg-config, OpenCV, libturbojpeg)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q pkg-config libopencv-dev libturbojpeg0-dev \
	  || { echo "error: could not install pkg-config libopencv-dev libturbojpeg0-dev; install them, then rerun make"; exit 1; }; \
	fi
	mkdir -p $(PKGCONF)
	ln -sf "$$(pkg-config --variable=pcfiledir opencv4)/opencv4.pc" $(PKGCONF)/opencv.pc

# The SLURM tests start a real one-node cluster (slurmctld, slurmd, munged): Debian's packages.
slurm:
	@if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then \
	  echo "installing SLURM and munge for the cluster tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q slurm-wlm munge \
	  || { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q slurm-wlm munge; } \
	  || echo "warning: could not install slurm-wlm and munge: the SLURM tests will say so and skip"; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel -q
	@if $(MAKE) --no-print-directory syslibs; then extras="dev,ffcv,dali"; \
	else extras="dev,dali"; echo "warning: FFCV's system libraries are missing: installing without the ffcv extra (its tests will skip)"; fi; \
	echo "pip install -e .[$$extras]"; \
	PKG_CONFIG_PATH=$(PKGCONF):$$PKG_CONFIG_PATH $(BIN)/python -m pip install -e ".[$$extras]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m peco_scale.data demo --out $(DEMO)/data
	$(DS_LAUNCH) launch/train_tokenizer.py --config configs/demo_tokenizer.yaml
	@echo "stage 1 done: tokenizer $(DEMO)/tokenizer/tokenizer.safetensors, metrics $(DEMO)/tokenizer/metrics.jsonl"
	@echo "stage 1 picture (input | reconstruction): $$(ls $(DEMO)/tokenizer/images/*.png | tail -1)"
	$(DS_LAUNCH) launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json --config configs/demo_pretrain.yaml
	$(BIN)/python -m peco_scale.tools.export $(DEMO)/pretrain
	@echo "stage 2 done: metrics $(DEMO)/pretrain/metrics.jsonl, timm backbone $(DEMO)/pretrain/backbone.safetensors"
	@echo "stage 2 picture (input | masked | prediction | tokenizer reconstruction): $$(ls $(DEMO)/pretrain/images/*.png | tail -1)"
	$(BIN)/python -m peco_scale.data demo --out $(DEMO)/val --seed 1 --images_per_class 30
	$(DS_LAUNCH) launch/finetune.py --deepspeed_config ds_configs/finetune_zero2_vitb.json --config configs/demo_finetune.yaml
	$(BIN)/python -m peco_scale.tools.export $(DEMO)/finetune --best
	$(BIN)/python -m peco_scale.tools.probe codeword --tokenizer $(DEMO)/tokenizer/tokenizer.safetensors --data $(DEMO)/data --val $(DEMO)/val --out $(DEMO)/codeword_probe.json
	@echo "stage 3 done: fine-tune metrics $(DEMO)/finetune/metrics.jsonl, timm classifier $(DEMO)/finetune/classifier.safetensors"

# Segment and detect on $(1)/data from the stage-2 backbone in $(1)/pretrain and from random
# initialisation, then the two tables; $(2): extra flags for the pre-trained detection run.
define dense_transfer
	$(DS_LAUNCH) launch/segment.py --config configs/demo_segment.yaml --data $(1)/data --init $(1)/pretrain --output_dir $(1)/segment/pretrained
	$(DS_LAUNCH) launch/segment.py --config configs/demo_segment.yaml --data $(1)/data --init '' --output_dir $(1)/segment/random
	$(DS_LAUNCH) launch/detect.py --config configs/demo_detect.yaml --data $(1)/data --init $(1)/pretrain $(2) --output_dir $(1)/detect/pretrained
	$(DS_LAUNCH) launch/detect.py --config configs/demo_detect.yaml --data $(1)/data --init '' --output_dir $(1)/detect/random
	$(BIN)/python -m peco_scale.tools.collect $(1)/segment
	$(BIN)/python -m peco_scale.tools.collect $(1)/detect
endef

# Dense transfer on the dense demo scenes: stage 2 (MAE) on 2000 unlabelled scenes, then that
# backbone against a random initialisation for segmentation (mIoU) and detection (box / mask AP) on
# the 200 labelled ones, then the two tables.
dense-demo: install
	$(BIN)/python -m peco_scale.data dense-demo --out runs/dense/data --unlabelled_images 2000
	$(DS_LAUNCH) launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json --config configs/demo_dense_pretrain.yaml
	$(call dense_transfer,runs/dense)

# The same on harder scenes with few labels: 2000 unlabelled and 50 labelled cluttered scenes, and
# the pre-trained detection run starts from the backbone's residual stream scaled to a fresh
# initialisation's size (the factor that peco_scale.tools.stream measures on the labelled scenes).
CLUTTERED := runs/dense_cluttered
dense-demo-cluttered: install
	$(BIN)/python -m peco_scale.data dense-demo --out $(CLUTTERED)/data --train_images 50 --unlabelled_images 2000 --style cluttered
	$(DS_LAUNCH) launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json --config configs/demo_dense_pretrain.yaml \
	  --data $(CLUTTERED)/data/unlabelled --output_dir $(CLUTTERED)/pretrain
	$(BIN)/python -m peco_scale.tools.stream --init $(CLUTTERED)/pretrain --model vit_pico_patch16 --img_size 64 \
	  --data $(CLUTTERED)/data/images --out $(CLUTTERED)/stream.json
	$(call dense_transfer,$(CLUTTERED),--model.stream_scale $$($(BIN)/python -c "import json; print(json.load(open('$(CLUTTERED)/stream.json'))['stream_scale'])"))

# Two test files at once (pytest-xdist, whole files per worker: a file's module fixtures and its
# SLURM cluster stay in one process): the launches leave a core idle a third of the time, so this
# took the suite from 34 to 20 minutes on 2 cores (2026-12-05 and -06). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install slurm
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf runs .pytest_cache

# The GPU check's wheels for the lent GPU machine (CPython 3.12): see launch/gpu_wheels.sh. Prints the device call.
gpu-wheels: install
	PYTHON=$(BIN)/python bash launch/gpu_wheels.sh
