# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install the pinned
# requirements first (torch==2.13.0: the CPU build on CI machines, the same version as the GPU image).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test demo schema clean weights gpu-check invokeai

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The demo: the toy world's pretrained mini SDXL (real SDXL classes, 64 px, committed in pti/toyworld/weights) has
# never drawn a heart. Train it on 10 renders of a red heart (trigger word TOK) through the Cog train() entry point, then
# ask the predictor for a blue TOK on a pink background: a colour and background it never saw the heart in. Training
# runs at the product's defaults (1000 steps, its learning rates and warmup) except what a 64 px world needs.
DEMO ?= demo_out
DEMO_ENV := SDXL_MODEL=mini-world COG_SDXL_CACHE=$(CURDIR)/.cache
DEMO_PROMPT ?= a photo of a blue TOK on a pink background

demo: $(VENV)/.installed
	$(PY) scripts/demo_subject.py $(DEMO)/subject.zip --shape heart
	$(DEMO_ENV) $(PY) cog_local.py train -o $(DEMO)/train -i input_images=@$(DEMO)/subject.zip \
		-i token_string=TOK -i resolution=64 \
		-i crop_based_on_salience=false -i captioning_model= -i validation_prompts="a photo of TOK|$(DEMO_PROMPT)" \
		-i validation_num_inference_steps=20 -i seed=0
	$(DEMO_ENV) $(PY) cog_local.py predict -o $(DEMO)/predict -i replicate_weights=@$(DEMO)/train/trained_model.tar \
		-i prompt="$(DEMO_PROMPT)" -i width=64 -i height=64 -i num_outputs=4 -i num_inference_steps=20 \
		-i guidance_scale=5 -i lora_scale=1 -i apply_watermark=false -i disable_safety_checker=true -i seed=0 \
		-i output_format=png
	@echo
	@echo "trained weights: $(CURDIR)/$(DEMO)/train/trained_model.tar"
	@echo "images ($(DEMO_PROMPT)):"
	@ls -d $(CURDIR)/$(DEMO)/predict/*

# After changing a train()/predict() signature: rewrite .cog/openapi_schema.json (the Cog server validates inputs
# with it) and the input tables in README.md. tests/test_packaging.py fails until this has been run.
schema: $(VENV)/.installed
	$(PY) scripts/generate_openapi.py

# Half-precision weights of every model the image uses into weights/ (cog build copies it into /src/weights).
weights: $(VENV)/.installed
	HF_HUB_OFFLINE=0 $(PY) scripts/download_weights.py

# InvokeAI's own loading code, apart from the product's environment, for tests/test_invokeai_loads_our_files.py
# (skipped without it: tests never download). Needs the package index once.
invokeai: $(VENV)/.installed
	$(PY) scripts/install_invokeai.py

# On a CUDA machine, offline: full-size SDXL with random weights, train() + predictor; one table, exit 1 on failure.
GPU_DEVICE ?= cuda
GPU_PY ?= python
gpu-check:
	$(GPU_PY) bench/gpu_check.py --device $(GPU_DEVICE)

clean:
	rm -rf $(VENV) .cache demo_out
