# The two commands a newcomer needs: `make demo` and `make test` (and `make serve` for the web page).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch goes in first and pinned (the CPU wheel): letting
# transformers/diffusers resolve torch themselves pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# diffusers is pinned: the DiT parity test compares against its Lumina-Next (<=0.32 has the 2/3 FFN).
DIFFUSERS_SPEC ?= diffusers==0.32.2
# lmms-eval runs the plugin's test: installed without its requirements (they would replace the CPU torch), then
# what it imports; its evaluator needs filelock 3
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3

.PHONY: install demo serve test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "$(DIFFUSERS_SPEC)" -e ".[test]"
	$(PIP) install -q --no-deps "$(LMMS_EVAL_SPEC)" accelerate
	$(PIP) install -q loguru datasets evaluate sacrebleu pytablewriter tenacity jsonlines psutil "filelock<4"
	$(PY) -c "import torch, transformers, diffusers, blip3o; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/blip3o demo --outdir demo_out

serve: install  # the web page and the OpenAI-compatible API at http://127.0.0.1:8000/
	HF_HUB_OFFLINE=1 $(VENV)/bin/blip3o serve

test: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	HF_HUB_OFFLINE=1 USE_FLAX=0 $(PY) -m pytest -q -x tests

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
