# Makefile -- builds luna into build/ (build/san/ with SAN=1) and runs its tests.
#   make            build everything          make run    encode on the demo model
#   make test       C unit tests + pytest     make bench  luna against PyTorch, full size (and LoRA modes)
#   make fuzz       libFuzzer targets, FUZZ_SECONDS each
#   SAN=1           AddressSanitizer + UndefinedBehaviorSanitizer build

CC      ?= cc
PYTHON  ?= /usr/bin/python3
SAN     ?= 0
FUZZ_SECONDS ?= 30

ifeq ($(SAN),1)
BUILD   := build/san
SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
OPT     := -O1
else
BUILD   := build
SANFLAGS :=
OPT     := -O2
endif

# x86-64-v3 (AVX2, FMA, F16C) is the baseline; OpenBLAS picks its own kernels at run time.
ARCH    ?= -march=x86-64-v3
CFLAGS  := -std=c11 $(OPT) -g $(ARCH) -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
           -D_GNU_SOURCE -pthread -Iinclude -Isrc -I/usr/include/cjson -MMD -MP $(SANFLAGS)
LDFLAGS := -pthread $(SANFLAGS)
LIBS    := -lopenblas -lcjson -lutf8proc -lz -lnettle -lm

LIB_SRC := $(sort $(wildcard src/core/*.c src/ops/*.c src/models/*.c src/text/*.c src/proto/*.c src/lora/*.c))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
CLI_SRC := $(sort $(wildcard src/cli/*.c))
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
SERVER_SRC := $(sort $(wildcard src/server/*.c))
SERVER_OBJ := $(SERVER_SRC:%.c=$(BUILD)/obj/%.o)
CLIENT_SRC := $(sort $(wildcard src/client/*.c))
CLIENT_OBJ := $(CLIENT_SRC:%.c=$(BUILD)/obj/%.o)
TEST_SRC := $(sort $(wildcard tests/unit/test-*.c))
TEST_BIN := $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)
BENCH_SRC := $(sort $(wildcard bench/*.c))
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)

.PHONY: all deps run test test-c test-py bench fuzz clean
all: $(BUILD)/luna $(BUILD)/lunad $(TEST_BIN) $(BENCH_BIN) $(BUILD)/demo/demo-sd1.safetensors

deps:
	@bash scripts/deps.sh

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libluna-internal.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

# libpng only for the CLI (luna decode / encode-image): lunad and libluna do not need it
$(BUILD)/luna: $(CLI_OBJ) $(BUILD)/libluna-internal.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS) -lpng

# ---- Client library: libluna.a and libluna.so (src/client/, API in include/luna.h) ----
# The client with the parts of luna it uses: the frame codec, status names, UTF-8 and
# safetensors entry validation. No BLAS, no models: it needs only -lcjson -lm.
# Both libraries are built from -fPIC -fvisibility=hidden objects in $(BUILD)/pic/, so
# only LUNA_API symbols are exported: the .so by the linker; the .a holds one object
# made with 'ld -r' whose hidden symbols 'objcopy --localize-hidden' turned local, so
# the internal names (st_*, frame_*, ...) cannot clash with a program's own.
# The LoRA identity needs nettle's SHA-256 (LGPL): the .so links libnettle.so; a
# static build links it too (-lcjson -lnettle -lm), so it can be replaced as the LGPL asks.
# The CLI reaches the client through libluna-internal.a, which gets the client too.
CLIENT_SRC  := $(sort $(wildcard src/client/*.c))
CLIENT_OBJ  := $(CLIENT_SRC:%.c=$(BUILD)/obj/%.o)
LUNALIB_SRC := $(CLIENT_SRC) $(sort $(wildcard src/proto/*.c)) \
               src/core/status.c src/core/utf8.c src/core/safetensors.c src/core/fp16.c \
               src/lora/lora_id.c
LUNALIB_PIC := $(LUNALIB_SRC:%.c=$(BUILD)/pic/%.o)
LUNALIB_LIBS := -lcjson -lnettle -lm

all: $(BUILD)/libluna.a $(BUILD)/libluna.so

$(BUILD)/libluna-internal.a: $(CLIENT_OBJ)

$(BUILD)/pic/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fPIC -fvisibility=hidden -c $< -o $@

$(BUILD)/libluna.so: $(LUNALIB_PIC)
	$(CC) $(LDFLAGS) -shared -Wl,--no-undefined -o $@ $^ $(LUNALIB_LIBS)

$(BUILD)/libluna.a: $(LUNALIB_PIC)
	ld -r -o $(BUILD)/pic/libluna-all.o $^
	objcopy --localize-hidden $(BUILD)/pic/libluna-all.o
	@rm -f $@
	ar rcs $@ $(BUILD)/pic/libluna-all.o

-include $(CLIENT_OBJ:.o=.d) $(LUNALIB_PIC:.o=.d)
# ---- end of the client library block ----------------------------------------------

# lunad: the daemon (src/server/), with the client library for the shared defaults
$(BUILD)/lunad: $(SERVER_OBJ) $(CLIENT_OBJ) $(BUILD)/libluna-internal.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libluna-internal.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libluna-internal.a $(LDFLAGS) $(LIBS) -lcmocka

$(BUILD)/bench/%: bench/%.c $(BUILD)/libluna-internal.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libluna-internal.a $(LDFLAGS) $(LIBS)

# The built-in demo model: a small CLIP-L with real names, random weights from a fixed seed.
$(BUILD)/demo/demo-sd1.safetensors: $(BUILD)/luna
	@mkdir -p $(dir $@)
	$(BUILD)/luna demo-model --out $@

# make run: the daemon in the foreground, on the built-in demo model unless
# MODELS_DIR (and PRELOAD, relative paths) name real ones; LUNAD_FLAGS adds flags.
MODELS_DIR ?=
PRELOAD ?=
LUNAD_FLAGS ?=
run: deps
	@$(MAKE) --no-print-directory $(BUILD)/luna $(BUILD)/lunad $(BUILD)/demo/demo-sd1.safetensors
	@echo "lunad: serving $(if $(MODELS_DIR),$(MODELS_DIR),the built-in demo model (meaningless embeddings))."
	@echo "  try, in another terminal: $(BUILD)/luna encode --model $(if $(MODELS_DIR),<file>,demo-sd1.safetensors) \
	--tokens examples/demo-tokens.json --out /tmp/cond.safetensors --summary"
	@echo "  and: $(BUILD)/luna decode --model $(if $(MODELS_DIR),<file>,demo-sd1.safetensors) \
	--latent examples/demo-latent.safetensors --out /tmp/image.png"
	@echo "  stop with Ctrl-C (in-flight work finishes first)."
	exec $(BUILD)/lunad --models-dir $(if $(MODELS_DIR),$(MODELS_DIR),$(BUILD)/demo) \
	    $(if $(MODELS_DIR),$(addprefix --preload ,$(PRELOAD)),--preload demo-sd1.safetensors) $(LUNAD_FLAGS)

test: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory test-c test-py

test-c: $(TEST_BIN)
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; $$t; done

test-py: $(BUILD)/luna
	LUNA_BUILD=$(BUILD) $(PYTHON) -m pytest -q tests/python

bench: deps
	@$(MAKE) --no-print-directory SAN=0 all
	LUNA_BUILD=build $(PYTHON) bench/bench.py
	LUNA_BUILD=build $(PYTHON) bench/bench_daemon.py
	LUNA_BUILD=build $(PYTHON) bench/bench_lora.py
	LUNA_BUILD=build $(PYTHON) bench/bench_vae.py
	build/bench/conv-rate

FUZZ_SRC := $(sort $(wildcard fuzz/fuzz-*.c))
FUZZ_BIN := $(FUZZ_SRC:fuzz/%.c=build/fuzz/%)
# lora_plan.c needs the models: the fuzz targets take only the file parser and its math
FUZZ_LIB := $(sort $(wildcard src/core/*.c src/text/*.c src/proto/*.c) \
              src/lora/lora_file.c src/lora/lora_id.c src/lora/lora_math.c)
build/fuzz/%: fuzz/%.c $(FUZZ_LIB)
	@mkdir -p $(dir $@)
	clang -std=c11 -O1 -g $(ARCH) -D_GNU_SOURCE -Iinclude -Isrc -I/usr/include/cjson \
	    -fsanitize=fuzzer,address,undefined -o $@ $< $(FUZZ_LIB) $(LIBS) -pthread

fuzz: deps
	@$(MAKE) --no-print-directory $(FUZZ_BIN)
	@set -e; for f in $(FUZZ_BIN); do \
	  n=$$(basename $$f); mkdir -p build/fuzz/corpus-$$n; \
	  echo "== $$n for $(FUZZ_SECONDS) s (log: build/fuzz/$$n.log)"; \
	  if ! $$f -max_total_time=$(FUZZ_SECONDS) -max_len=65536 build/fuzz/corpus-$$n fuzz/seeds/$$n \
	       > build/fuzz/$$n.log 2>&1; then tail -60 build/fuzz/$$n.log; exit 1; fi; \
	  grep -E '^Done [0-9]+ runs' build/fuzz/$$n.log || tail -2 build/fuzz/$$n.log; \
	done

clean:
	rm -rf build

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(SERVER_OBJ:.o=.d) $(CLIENT_OBJ:.o=.d)
