# Self-supervised pretraining for cardiac MRI segmentation: the study as a dependency graph.
#
#   make report                      the whole study on the built-in phantom (PROFILE=default)
#   make report DATA=/path/to/ACDC   the same on real ACDC (official NIfTI release or SSL4MIS HDF5);
#                                    more folders, comma-separated, add pretraining-only sources
#   make report PROFILE=paper        the study's full protocol (224 px, 40 epochs, all budgets; for a GPU)
#   make report EXTERNAL=/a,/b       also score every run on labelled folders of other datasets (any layout)
#   make run RUN=swav-150-s0         one run of the sweep (more: RUN="a b"), with the stages it needs first
#   make predict RUN=random-all-s0 INPUT=/scans OUTPUT=/masks   segment new scans with a trained run
#   make framing RUN=random-all-s0 [SPLIT=val]   the framing test: Dice with the scans cropped or padded
#   make test                        the test suite
#   JOBS=1                           one run at a time (default: one per core)
#
# Every stage is a notebook executed by Papermill into reports/<data>/<profile>/executed/; each run is a
# target of its own, so `make -j N` runs independent runs in parallel, a second `make report` with nothing
# changed does nothing, and an interrupted sweep resumes where it stopped.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SECONDEXPANSION:
MAKEFLAGS += --no-builtin-rules

# Independent runs go in parallel, one per core, each with its share of the cores: two processes with one thread
# each train about 1.5x faster here than one with two, and oversubscribed threads are about 10x slower.
# Output is not synchronised (no --output-sync): each training run's per-epoch lines must reach the terminal while
# it runs; every line names its run, so the lines of parallel runs read apart.
NPROC := $(shell nproc 2>/dev/null || echo 1)
# On a GPU machine several runs share the GPU, so that kernel start-up and each run's CPU-side work overlap: one
# run per GIB_PER_RUN GiB of the first GPU's memory (16: a 224 px run at the study's batch sizes in bf16, an
# estimate), at most one per core. With trainer.devices > 1 (every run on every GPU) use JOBS=1.
GPU_GIB := $(shell nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | awk 'NR==1 {print int($$1 / 1024)}')
GIB_PER_RUN ?= 16
JOBS ?= $(if $(GPU_GIB),$(shell j=$$(( $(GPU_GIB) / $(GIB_PER_RUN) )); j=$$(( j < $(NPROC) ? j : $(NPROC) )); echo $$(( j > 0 ? j : 1 ))),$(NPROC))
MAKEFLAGS += -j$(JOBS)
jobs = $(or $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS))),$(NPROC))
threads = $(shell t=$$(( $(NPROC) / $(jobs) )); echo $$(( t > 0 ? t : 1 )))

PROFILE ?= default
DATA ?=
EXTERNAL ?=
PROFILES := $(sort $(basename $(notdir $(wildcard params/*.yaml))))
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL := cmr-ssl
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg

.DEFAULT_GOAL := help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE) (params/<name>.yaml)  DATA=<folder>[,<folder>...] (empty: phantom)"

# ------------------------------------------------------------------------------------------ environment
env: $(STAMP) ## create the virtual environment, pinned packages and the Jupyter kernel
$(STAMP): requirements.txt constraints.txt pyproject.toml tools/setup_env.py tools/cmr_torchvision_shim.py \
		tools/ipython_kernel_config.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) tools/setup_env.py
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cmr-ssl)" > /dev/null
	touch $@

# ------------------------------------------------------------------------------------------ the plan
# Run names, folders and the data tag come from cmr_utils (the one module that knows the layout).
PLAN := .make/plan-$(PROFILE)-$(shell printf '%s|%s|%s' "$(DATA)" "$(CMR_OUTPUT_ROOT)" "$(EXTERNAL)" | cksum | cut -d' ' -f1).mk
# what the plan is made from (PROFILE_FILES and MODULES_plan come from the dependencies file included below)
PLAN_INPUTS = $(STAMP) params/$(PROFILE).yaml $(PROFILE_FILES) $(MODULES_plan)
$(PLAN): $$(PLAN_INPUTS)
	@mkdir -p $(dir $@)
	$(PY) -m cmr_utils.plan --profile $(PROFILE) --data "$(DATA)" --external "$(EXTERNAL)" --make > $@.tmp && mv $@.tmp $@
# What each stage depends on (cmr_utils/dependencies.py, docs/make.md): MODULES_<stage>, the package modules its
# notebook may run, read from the import statements; PARAMETERS_<stage>, the parameter stamps it reads;
# PROFILE_FILES, the profile's file and the files it extends.
DEPENDENCIES := .make/dependencies-$(PROFILE).mk
$(DEPENDENCIES): $(STAMP) $(wildcard notebooks/*.py cmr_utils/*.py cmr_utils/*/*.py params/*.yaml)
	@mkdir -p $(dir $@)
	$(PY) -m cmr_utils.dependencies --profile $(PROFILE) --make > $@.tmp && mv $@.tmp $@
# (a stage's goal, or one of its files: `make -q <executed notebook>` asks whether that one is up to date)
ifneq ($(filter report prepare pretrain finetune evaluate explain run clean-outputs %.ipynb %/report.html,$(MAKECMDGOALS)),)
ifeq ($(filter $(PROFILE),$(PROFILES)),)
$(error profile '$(PROFILE)' does not exist (no params/$(PROFILE).yaml); the profiles that exist: $(PROFILES))
endif
include $(DEPENDENCIES)
include $(PLAN)
# The parameter stamps ($(RUNS_DIR)/params/<section>.json, one per group of parameters a stage reads) and the
# EXTERNAL= value, each rewritten only when its content changes, while Make reads this file: before it decides
# anything, so that `make -n`, `-q` and `-t` see what `make` would.
PARAMS_STAMPS = $(RUNS_DIR)/params
EXTERNAL_VALUE = $(RUNS_DIR)/evaluate/external.txt
ifneq ($(RUNS_DIR),)
$(shell $(PY) -m cmr_utils.dependencies --profile $(PROFILE) --stamps $(PARAMS_STAMPS) >&2)
ifneq ($(.SHELLSTATUS),0)
$(error the parameter stamps of PROFILE=$(PROFILE) could not be written (the line above says why))
endif
$(shell mkdir -p $(dir $(EXTERNAL_VALUE)) && { printf '%s\n' "$(EXTERNAL)" | cmp -s - $(EXTERNAL_VALUE) || printf '%s\n' "$(EXTERNAL)" > $(EXTERNAL_VALUE); })
endif
# `make run` checks RUN against the plan's runs once the plan exists and is up to date: a plan older than what it is
# made from (a budget just added to the profile) is remade first, and make reads this file again with its runs
PLAN_STALE = $(if $(wildcard $(DEPENDENCIES)),$(shell find $(PLAN_INPUTS) -newer $(PLAN) 2>/dev/null | head -n 1),unknown)
ifneq ($(and $(filter run,$(MAKECMDGOALS)),$(wildcard $(PLAN)),$(if $(PLAN_STALE),,fresh)),)
ifeq ($(strip $(RUN)),)
$(error make run needs RUN=<run>[ <run>...]; the runs of PROFILE=$(PROFILE) DATA=$(DATA): $(RUNS))
endif
ifneq ($(filter-out $(RUNS),$(RUN)),)
$(error RUN: $(filter-out $(RUNS),$(RUN)) not in the plan of PROFILE=$(PROFILE) DATA=$(DATA); its runs: $(RUNS))
endif
endif
endif

# a stage's own inputs besides the stages before it: the modules its notebook may run, its parameter stamps, the venv
stage_inputs = $(MODULES_$(1)) $(PARAMETERS_$(1):%=$(PARAMS_STAMPS)/%.json) $(STAMP)
EXE = $(REPORTS_DIR)/executed
PREP = $(EXE)/01_prepare_data.ipynb
PRETRAIN = $(METHODS:%=$(EXE)/02_pretrain-%.ipynb)
FINETUNE = $(RUNS:%=$(EXE)/03_finetune-%.ipynb)
EVALUATE = $(EXE)/04_evaluate.ipynb
EXPLAIN = $(EXE)/05_explain.ipynb
REPORT = $(EXE)/06_report.ipynb

# position of word $(1) in the list $(2), counted from 1: $(call position,b,a b c) is 2
position = $(words $(call upto,$(1),$(2)))
upto = $(if $(2),$(firstword $(2)) $(if $(filter $(1),$(firstword $(2))),,$(call upto,$(1),$(wordlist 2,$(words $(2)),$(2)))))

# papermill NOTEBOOK,[-p name value ...],[where the sweep stands]: runs notebooks/NOTEBOOK.py (the paired .py is
# the source), writes to a temporary name and renames on success; a failed run is kept as *.failed.ipynb for
# reading. A kernel gets 10 min to start: on a loaded CI machine one took longer than papermill's default 60 s.
# One line when a stage starts and one when it ends; in between, each training run prints one line per epoch on
# stderr (CMR_PROGRESS=plain, cmr_utils/training.py), which the kernel inherits from Make.
define papermill
@mkdir -p $(@D)
@echo "[$(PROFILE)/$(TAG)] $(notdir $@): started$(if $(3), · $(3))"
@CMR_PROGRESS=plain OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(threads)} $(PY) -m papermill $(NB)/$(1).ipynb $@.tmp.ipynb -k $(KERNEL) --language python --log-level WARNING --no-progress-bar --start-timeout 600 \
	-p profile $(PROFILE) -p data "$(DATA)" $(2) \
	|| { mv -f $@.tmp.ipynb $(@:.ipynb=.failed.ipynb) 2>/dev/null || true; \
	     echo "[$(PROFILE)/$(TAG)] $(notdir $@): FAILED after $$SECONDS s; read $(@:.ipynb=.failed.ipynb)" >&2; exit 1; }; \
	echo "[$(PROFILE)/$(TAG)] $(notdir $@): done in $$((SECONDS / 60)) min $$((SECONDS % 60)) s$(if $(3), · $(3))"
@rm -f $(@:.ipynb=.failed.ipynb)
@mv $@.tmp.ipynb $@
endef

# each notebook converted from its .py once, not once per run: 24 conversions of 03 cost about 2 CPU-seconds each
NB := .make/notebooks
$(NB)/%.ipynb: notebooks/%.py $(STAMP)
	@mkdir -p $(@D)
	@$(PY) -m jupytext --quiet --to ipynb -o $@.tmp.ipynb $< && mv $@.tmp.ipynb $@

prepare: $(PREP) ## stage 01: patient-level splits and slice sets
pretrain: $(PRETRAIN) ## stage 02: self-supervised pretraining, one run per method of pretrain.methods
finetune: $(FINETUNE) ## stage 03: the fine-tuning sweep (init x budget x seed)
run: $(addprefix $(EXE)/03_finetune-,$(addsuffix .ipynb,$(RUN))) ## stage 03 for the runs named in RUN="..." only (and the stages they need)
evaluate: $(EVALUATE) ## stage 04: test-set evaluation, ACDC metrics, statistics across seeds
explain: $(EXPLAIN) ## stage 05: Seg-Grad-CAM and explanation numbers
report: $(REPORTS_DIR)/report.html ## every stage, then reports/<data>/<profile>/report.html
	@ln -sfn $(TAG)/$(PROFILE)/report.html $(OUTPUT_ROOT)/reports/report.html
	@echo "report: $(REPORTS_DIR)/report.html (also linked as $(OUTPUT_ROOT)/reports/report.html)"

$(PREP): $(NB)/01_prepare_data.ipynb $(call stage_inputs,01_prepare_data)
	$(call papermill,01_prepare_data)

# (a static pattern rule: its stamp pretrain-%.json is the method's, e.g. pretrain-swav.json)
$(PRETRAIN): $(EXE)/02_pretrain-%.ipynb: $(NB)/02_pretrain.ipynb $(PREP) $(call stage_inputs,02_pretrain)
	$(call papermill,02_pretrain,-p method $*,pretraining $(call position,$*,$(METHODS)) of $(words $(METHODS)))

# an SSL-initialised run also waits for (and re-runs after) its method's pretraining
ssl_prereq = $(if $(filter $(METHODS),$(firstword $(subst -, ,$(1)))),$(EXE)/02_pretrain-$(firstword $(subst -, ,$(1))).ipynb)
# an ImageNet run recorded as unavailable re-runs once the weights file appears in the torch hub cache
TORCH_HUB := $(or $(TORCH_HOME),$(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME)/torch),$(HOME)/.cache/torch)/hub
imagenet_prereq = $(if $(filter imagenet,$(firstword $(subst -, ,$(1)))),$(wildcard $(TORCH_HUB)/checkpoints/resnet18-*.pth))
$(FINETUNE): $(EXE)/03_finetune-%.ipynb: $(NB)/03_finetune.ipynb $(PREP) $(call stage_inputs,03_finetune) \
		$$(call ssl_prereq,$$*) \
		$$(call imagenet_prereq,$$*)
	$(call papermill,03_finetune,-p run $*,fine-tuning run $(call position,$*,$(RUNS)) of $(words $(RUNS)))

# stages 04 and 06 re-run when the EXTERNAL= value changes (EXTERNAL_VALUE, written above)
$(EVALUATE): $(NB)/04_evaluate.ipynb $(FINETUNE) $(call stage_inputs,04_evaluate) $(EXTERNAL_VALUE)
	$(call papermill,04_evaluate,-p external "$(EXTERNAL)")

$(EXPLAIN): $(NB)/05_explain.ipynb $(EVALUATE) $(call stage_inputs,05_explain)
	$(call papermill,05_explain)

$(REPORT): $(NB)/06_report.ipynb $(PREP) $(PRETRAIN) $(EVALUATE) $(EXPLAIN) $(call stage_inputs,06_report) \
		$(EXTERNAL_VALUE)
	$(call papermill,06_report,-p external "$(EXTERNAL)")

# stages 01, 04, 05 and 06 never run beside another stage (each waits for every stage before it, and every later
# stage waits for it), so they take all the cores (`private`: the runs they wait for keep their share)
$(PREP) $(EVALUATE) $(EXPLAIN) $(REPORT): private threads = $(NPROC)

$(REPORTS_DIR)/report.html: $(REPORT)
	$(PY) -m jupyter nbconvert --to html --no-input --log-level WARN --output-dir $(@D) --output report.tmp $<
	mv $(@D)/report.tmp.html $@

# ------------------------------------------------------------------------------------------ people
test: $(STAMP) ## run the test suite
	$(PY) -m pytest -q

lab: $(STAMP) ## open JupyterLab on the notebooks
	$(PY) -m jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

bench: $(STAMP) ## print speed figures: data preparation, pretraining, fine-tuning, Seg-Grad-CAM
	$(PY) benchmarks/bench_prepare.py
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/bench_finetune.py
	$(PY) benchmarks/bench_cam.py

sync: $(STAMP) ## re-pair the notebooks (.py <-> .ipynb) after editing one outside JupyterLab
	$(PY) -m jupytext --sync notebooks/*.py

clean-outputs: ## delete the runs and reports of this PROFILE and DATA
	rm -rf $(RUNS_DIR) $(REPORTS_DIR)

.PHONY: help env prepare pretrain finetune run evaluate explain report test lab bench sync clean-outputs

# ------------------------------------------------------------------------------------------ new scans
# make predict RUN=<run folder, or init-budget-sSEED> INPUT=<folder> OUTPUT=<folder> [PROFILE=...] [DATA=...]
#              [LABEL_MAP=1:3,2:2,3:1] [DICOM_SEG=1]
# RUN is the path of a run folder (it carries its plans.json: a copy anywhere works), or a run name looked up in the
# workspace of PROFILE and DATA (where it was trained); INPUT may hold any supported layout; OUTPUT gets
# <case>_pred.nii.gz (the input's grid and header) and volumes.csv, and with DICOM_SEG=1 (DICOM input only) DICOM
# Segmentation objects referencing the source images. See docs/predict.md.
RUN ?=
INPUT ?=
OUTPUT ?=
LABEL_MAP ?=
DICOM_SEG ?=
predict: $(STAMP) ## segment the scans of INPUT with run RUN into OUTPUT (NIfTI masks, volumes.csv; DICOM_SEG=1: DICOM-SEG)
	$(PY) -m cmr_utils.predict_command --run "$(RUN)" --input "$(INPUT)" --output "$(OUTPUT)" --profile $(PROFILE) \
		--data "$(DATA)" $(if $(LABEL_MAP),--label-map "$(LABEL_MAP)") $(if $(filter 1 yes true,$(DICOM_SEG)),--dicom-seg)

# make framing RUN=<init>-<budget>-s<seed> [SPLIT=val|test] [PROFILE=...] [DATA=...]: the framing test of one
# trained run (cmr_utils/framing.py): Dice on the split's patients as framed, cropped around the heart and padded.
SPLIT ?= val
framing: $(STAMP) ## Dice of run RUN on the SPLIT (val) patients framed as other centres frame them
	$(PY) -m cmr_utils.framing --run "$(RUN)" --split $(SPLIT) --profile $(PROFILE) --data "$(DATA)"

.PHONY: predict framing
