# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install the pinned
# requirements first (torch==2.13.0: the CPU build on CI machines, the same version as the GPU image).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test demo schema clean weights gpu-check

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The demo: four photos that scikit-image ships → preprocess → train briefly → predict with the trained tar, all on
# the tiny base model (real SDXL architecture, random weights: the images are noise) on the CPU.
DEMO ?= demo_out
DEMO_ENV := SDXL_MODEL=tiny COG_SDXL_CACHE=$(CURDIR)/.cache

demo: $(VENV)/.installed
	$(PY) scripts/demo_photos.py $(DEMO)/photos.zip
	$(DEMO_ENV) $(PY) -c "from pti.models.base_model import resolve_model_dir; print('tiny base model:', resolve_model_dir('tiny'))"
	$(DEMO_ENV) $(PY) cog_local.py train -o $(DEMO)/train -i input_images=@$(DEMO)/photos.zip \
		-i token_string=TOK -i caption_prefix="a photo of TOK" -i resolution=64 -i train_batch_size=2 -i max_train_steps=30 \
		-i use_face_detection_instead=true -i captioning_model= -i validation_num_inference_steps=8 -i seed=0
	$(DEMO_ENV) $(PY) cog_local.py predict -o $(DEMO)/predict -i replicate_weights=@$(DEMO)/train/trained_model.tar \
		-i prompt="a photo of TOK" -i width=128 -i height=128 -i num_inference_steps=8 -i seed=0 -i output_format=png
	@echo
	@echo "trained weights: $(CURDIR)/$(DEMO)/train/trained_model.tar"
	@echo "images:          $$(ls -d $(CURDIR)/$(DEMO)/predict/*)"

# After changing a train()/predict() signature: rewrite .cog/openapi_schema.json (the Cog server validates inputs
# with it) and the input tables in README.md. tests/test_packaging.py fails until this has been run.
schema: $(VENV)/.installed
	$(PY) scripts/generate_openapi.py

# Half-precision weights of every model the image uses into weights/ (cog build copies it into /src/weights).
weights: $(VENV)/.installed
	HF_HUB_OFFLINE=0 $(PY) scripts/download_weights.py

# On a CUDA machine, offline: full-size SDXL with random weights, train() + predictor; one table, exit 1 on failure.
GPU_DEVICE ?= cuda
GPU_PY ?= python
gpu-check:
	$(GPU_PY) bench/gpu_check.py --device $(GPU_DEVICE)

clean:
	rm -rf $(VENV) .cache demo_out
