#!/usr/bin/env bash
# Fuzz every cargo-fuzz target of fuzz/ for a bounded time (issue 7, "Fuzzing"): .ci/run calls
# it after the release build. `FUZZ_SECONDS=N bash .ci/fuzz.sh [target...]` by hand.
#
# - Stable toolchain, no sanitizer (`--sanitizer none`): the gateway forbids `unsafe`, so what
#   fuzzing finds is panics, hangs and unbounded allocation. libFuzzer's -malloc_limit_mb
#   needs a sanitizer's malloc hooks; fuzz/src/lib.rs caps single allocations instead, and
#   -rss_limit_mb and -timeout bound memory and time per input.
# - RocksDB's C++ is not compiled again: librocksdb-sys links the static library of the main
#   release build ($CARGO_TARGET_DIR), which must exist. fuzz/Cargo.lock must therefore pin
#   the same versions as Cargo.lock (checked below).
# - Each target starts from the committed seeds (fuzz/corpus/<target>) and regression inputs
#   (fuzz/regressions/<target>), read only, plus a scratch corpus kept under
#   $FUZZ_TARGET_DIR/work across runs, so later runs go on where earlier ones stopped.
# - A crash fails the step and leaves the input in $FUZZ_TARGET_DIR/work/<target>/artifacts:
#   copy it into fuzz/regressions/<target>/, fix the parser and name a test after it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -d $HOME/.cargo/bin ]] && PATH="$HOME/.cargo/bin:$PATH"
MAIN_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/dicom-gateway-target}
# Its own target dir: other RUSTFLAGS, so it never invalidates the main build.
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/tmp/dicom-gateway-fuzz-target}
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
CARGO_FUZZ_VERSION=0.13.2
TOOLS_ROOT=/var/tmp/dicom-gateway-tools/cargo

# cargo-fuzz from crates.io, built once per machine into the tools folder (about 1 CPU-minute).
CARGO_FUZZ="$TOOLS_ROOT/bin/cargo-fuzz"
if ! "$CARGO_FUZZ" --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
	CARGO_TARGET_DIR=/var/tmp/dicom-gateway-tools/cargo-fuzz-build \
		cargo install --locked --quiet --root "$TOOLS_ROOT" "cargo-fuzz@$CARGO_FUZZ_VERSION"
	rm -rf /var/tmp/dicom-gateway-tools/cargo-fuzz-build
fi

# fuzz/Cargo.lock pins only versions that Cargo.lock pins too (librocksdb-sys above all: its
# Rust bindings come from its own headers and must match the library linked).
check_locks() {
	python3 - <<'EOF'
import re, sys
# Read as text (tomllib is Python 3.11+): each [[package]] starts with its name and version.
def load(path):
    versions = {}
    with open(path) as f:
        for name, version in re.findall(r'^name = "([^"]+)"\nversion = "([^"]+)"', f.read(), re.M):
            versions.setdefault(name, set()).add(version)
    return versions
main, fuzz = load("Cargo.lock"), load("fuzz/Cargo.lock")
bad = sorted(n for n in main.keys() & fuzz.keys() if fuzz[n] - main[n])
if bad:
    sys.exit("fuzz/Cargo.lock pins versions Cargo.lock does not, of: " + ", ".join(bad) +
             "\n(copy Cargo.lock over fuzz/Cargo.lock and run .ci/fuzz.sh again)")
EOF
}
check_locks

lib=$(ls -t "$MAIN_TARGET_DIR"/release/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n 1 || true)
if [[ -z $lib ]]; then
	echo "no librocksdb.a under $MAIN_TARGET_DIR/release/build: run the release build first" >&2
	exit 1
fi
export ROCKSDB_LIB_DIR=${lib%/*} ROCKSDB_STATIC=1
echo "RocksDB from $ROCKSDB_LIB_DIR"

FUZZ=("$CARGO_FUZZ" --sanitizer none --target-dir "$FUZZ_TARGET_DIR")
# The same flags for build and run, so `run` finds the build up to date.
started=$SECONDS
"${FUZZ[0]}" build "${FUZZ[@]:1}"
check_locks
echo "fuzz build: $((SECONDS - started))s"

if (($#)); then
	targets=("$@")
else
	targets=()
	for f in fuzz/fuzz_targets/*.rs; do
		t=${f##*/}
		targets+=("${t%.rs}")
	done
fi
for t in "${targets[@]}"; do
	work=$FUZZ_TARGET_DIR/work/$t
	# The scratch corpus grows from run to run; past 20,000 inputs it starts again from the
	# seeds, which bounds its disk use and its load time.
	if [[ -d $work/corpus ]] && (($(find "$work/corpus" -type f | wc -l) > 20000)); then
		rm -rf "$work/corpus"
	fi
	mkdir -p "$work/corpus" "$work/artifacts"
	inputs=("$work/corpus" "fuzz/corpus/$t")
	[[ -d fuzz/regressions/$t ]] && inputs+=("fuzz/regressions/$t")
	echo "=== fuzzing $t for ${FUZZ_SECONDS}s"
	if ! "${FUZZ[0]}" run "${FUZZ[@]:1}" "$t" "${inputs[@]}" -- \
		-max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=1024 -max_len=32768 \
		-artifact_prefix="$work/artifacts/" -print_final_stats=1 2>"$work/log"; then
		tail -n 60 "$work/log" >&2
		echo "fuzz target $t failed: the input is in $work/artifacts/;" \
			"copy it into fuzz/regressions/$t/ and fix the parser (see fuzz/README.md)" >&2
		exit 1
	fi
	grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)' "$work/log" | tr '\n' ' '
	echo
done
