# Two commands, on a fresh Debian 12 machine as root:
#   make demo   set up, then run the main job for about a minute
#   make test   set up, then run the whole test suite
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
APT_PKGS := build-essential liburing-dev liblz4-dev libzstd-dev fuse3 libfuse3-dev pkg-config python3-venv python3-dev redis-server redis-tools prometheus stress-ng
STAMP   := build/.stamp

.PHONY: all setup native demo test lint clean

all: setup

# apt packages: installed only when one is missing, so a set-up machine
# does not touch the network again
build/.apt:
	@mkdir -p build
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml build/.apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

native: $(VENV)/.installed
	$(MAKE) -s -C native
	$(PY) native/cffi/build.py >/dev/null

setup: native

demo: setup
	$(PY) -m uffdsrv.demo

test: setup
	$(PY) -m pytest -q -rs tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build $(VENV) uffdsrv/_bin uffdsrv/_native*.so

# The end-to-end subset on Debian 12's own kernel (6.1), booted under QEMU
# (TCG) with virtme-ng; the kernel package is downloaded into build/kernel,
# never installed as the host's (tests/kernel/vm.py says how).
KERNEL_APT := qemu-system-x86 busybox-static e2fsprogs kmod file
VNG        := build/vng/bin/vng

.PHONY: test-kernel

build/.apt-kernel:
	@mkdir -p build
	@missing=$$(for p in $(KERNEL_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

$(VNG):
	$(PYTHON) -m venv build/vng
	build/vng/bin/pip install -q virtme-ng

test-kernel: setup build/.apt-kernel $(VNG)
	$(PY) -m tests.kernel.vm
