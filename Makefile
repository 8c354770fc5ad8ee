# Both entry points bootstrap .venv themselves: a fresh machine needs only Python 3.11+ and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean browser

# The hot path is compiled by mypyc (setup.py, src/redlb/build.py): in place, beside the sources,
# wherever a C compiler, the Python headers and mypyc are found (build.py says which build that
# is); REDLB_PURE=1 runs the pure package instead.  The install itself is pure (one compile, here,
# with the venv's mypyc and build/ as its cache).
COMPILED := $(VENV)/.compiled
# Every module build.py's COMPILED names (an edit to one not listed here would leave make
# test expecting a compiled build that runs pure: test_build fails).
HOT_SOURCES := $(wildcard src/redlb/proxy/*.py src/redlb/routing/*.py src/redlb/balancer/*.py) \
	src/redlb/metrics/recorder.py src/redlb/store/rotation.py src/redlb/health/passive.py \
	src/redlb/accesslog.py src/redlb/build.py setup.py
# Data-path tests run a second time on the pure package (REDLB_PURE=1), the fallback without
# a compiler: the hostile-input and the request/response paths, about two minutes.
PURE_TESTS := tests/test_hostile_parsing.py tests/test_data_path.py tests/test_repeat_heads.py \
	tests/test_build.py tests/test_repeat_reads.py
PURE := $(filter-out 0,$(REDLB_PURE))
# What the suite must run on (tests/test_build.py checks): a compile that failed (mypyc's type
# check, say) installs pure without failing, and must fail the tests instead.  Evaluated when a
# recipe uses it, once the venv exists.
EXPECT_BUILD = $(if $(PURE),pure,$(shell $(BIN)/python src/redlb/build.py))
BUILD := $(if $(PURE),$(STAMP),$(COMPILED))

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	REDLB_PURE=1 $(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# An edited hot-path source is compiled again before the tests, the demo or the bench run;
# meanwhile redlb runs it pure (build.py: the extensions no longer match their sources).
$(COMPILED): $(STAMP) $(HOT_SOURCES)
	env -u REDLB_PURE $(BIN)/python setup.py --quiet build_ext --inplace
	touch $(COMPILED)

demo: $(BUILD)
	$(BIN)/redlb demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# The whole suite on the build expected here, then the data-path tests pure when that was the
# compiled one.
test: lint browser $(BUILD)
	REDLB_EXPECT_BUILD=$(EXPECT_BUILD) $(BIN)/pytest -q -p no:cacheprovider
	$(if $(filter compiled,$(EXPECT_BUILD)),REDLB_PURE=1 REDLB_EXPECT_BUILD=pure \
		$(BIN)/pytest -q -p no:cacheprovider $(PURE_TESTS))

# The dashboard test drives Debian's chromium + chromium-driver; installed here when missing.
browser: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| $(BIN)/python tests/browser.py

bench: $(BUILD)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/idle_memory.py
	$(BIN)/python bench/readme.py

clean:
	rm -rf $(VENV) .redlb .mypy_cache .ruff_cache .pytest_cache build src/redlb/compiled.sha256
	find src -name '*.so' -delete
