# `make demo`: install + stage 1 then stage 2 on the embedded demo data.  `make test`: install + the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
# Two CPU ranks under the real deepspeed launcher (gloo); on a GPU box use --num_gpus N.
DS_LAUNCH := DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/deepspeed --num_gpus 2 --master_port $${MASTER_PORT:-29511}

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel -q
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m peco_scale.data demo --out $(DEMO)/data
	$(DS_LAUNCH) launch/train_tokenizer.py --config configs/demo_tokenizer.yaml
	@echo "stage 1 done: tokenizer $(DEMO)/tokenizer/tokenizer.safetensors, metrics $(DEMO)/tokenizer/metrics.jsonl"
	$(DS_LAUNCH) launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json --config configs/demo_pretrain.yaml
	$(BIN)/python -m peco_scale.export $(DEMO)/pretrain
	@echo "stage 2 done: metrics $(DEMO)/pretrain/metrics.jsonl, timm backbone $(DEMO)/pretrain/backbone.safetensors"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
