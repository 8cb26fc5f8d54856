#!/usr/bin/env bash
# Builds the page's WebAssembly: selattn-web for wasm32-unknown-unknown, then wasm-bindgen
# (the CLI version must equal the wasm-bindgen crate's, 0.2.130) into web/pkg/.
#   rustup target add wasm32-unknown-unknown
#   cargo install wasm-bindgen-cli --version 0.2.130
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --target wasm32-unknown-unknown --lib
wasm-bindgen --target web --no-typescript --out-dir pkg \
  target/wasm32-unknown-unknown/release/selattn_web.wasm
echo "built web/pkg; serve with: python3 -m http.server -d web 8000  (then open http://localhost:8000)"
