#!/usr/bin/env bash
# Soak test: builds the release binary and runs examples/soak.rs — minutes of mixed load with
# injected faults, client disconnects, config reloads and SIGHUPs against the local Apple
# stand-in (loopback only, bounded in time). Prints counts by kind and outcome and the
# proxy's RSS at start and end; exits 1 on unexpected failures or memory growth.
#
# Usage: scripts/soak.sh [SECONDS=180] [WORKERS=8]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin apple-api-proxy --example soak
exec ./target/release/examples/soak "${1:-180}" "${2:-8}"
