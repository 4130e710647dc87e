#!/usr/bin/env bash
# Build every fuzz target and run each for FUZZ_SECONDS (default 15). Exits non-zero if any
# target crashes, hangs (an input taking over FUZZ_TIMEOUT seconds) or fails to build.
#
#   fuzz/run.sh                      # all targets, 15 s each
#   FUZZ_SECONDS=600 fuzz/run.sh config manifest
#   FUZZ_GROW_CORPUS=1 fuzz/run.sh   # keep new inputs in fuzz/corpus/<target> (default: a scratch dir)
#
# Needs the nightly toolchain and cargo-fuzz (installed from crates.io when missing).
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_EACH="${FUZZ_SECONDS:-15}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
CARGO_FUZZ_VERSION=0.13.2

if ! cargo +nightly --version >/dev/null 2>&1 && command -v rustup >/dev/null; then
  echo "run.sh: installing the nightly toolchain (rustup)" >&2
  rustup toolchain install nightly --profile minimal || true
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "run.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "run.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  if [ "${FUZZ_GROW_CORPUS:-0}" = 1 ]; then
    dirs=("corpus/$t")
  else
    # New inputs go to the scratch dir; the committed corpus is only read.
    mkdir -p "$scratch/$t"
    dirs=("$scratch/$t" "corpus/$t")
  fi
  dict=()
  [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
  echo "== $t: ${SECONDS_EACH}s"
  log="$scratch/$t.log"
  if cargo +nightly fuzz run "$t" "${dirs[@]}" -- \
      -max_total_time="$SECONDS_EACH" -timeout="$TIMEOUT" -rss_limit_mb=2048 "${dict[@]}" >"$log" 2>&1; then
    grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || tail -1 "$log"
  else
    tail -n 60 "$log"
    echo "!! $t failed; inputs under fuzz/artifacts/$t:" >&2
    ls -1 "artifacts/$t" >&2 || true
    failed+=("$t")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzzing: ${#targets[@]} targets, ${SECONDS_EACH}s each, no crash"
