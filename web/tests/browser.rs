//! Attention calls through the wasm build in a real browser (headless Chromium in CI, via
//! wasm-bindgen-test-runner and chromedriver), each against the f64 CPU reference on seeded
//! random inputs with poisoned outputs: plain, temperature, gate, selective, kv_len, GQA; f32.
//!
//! `web/ci/browser-tests.sh` runs them.

use selattn::{DType, Path, Shape, Switches};
use selattn_web::{context, run_one, Case, Row, Variant};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn variant(name: &'static str, causal: bool, selective: bool, inputs: Switches) -> Variant {
    Variant {
        name,
        switches: Switches {
            causal,
            selective,
            ..inputs.inputs()
        },
    }
}

const NONE: Switches = Switches::NONE;

async fn check(case: Case, var: Variant, seed: u64) {
    let ctx = context().await.expect("a WebGPU device");
    let row: Row = run_one(&ctx, &case, &var, DType::F32, Path::Scalar, seed).await;
    assert!(
        row.pass && row.error.is_none(),
        "{} on {}: {}",
        var.name,
        case.name,
        row.json()
    );
}

fn case(name: &'static str, shape: Shape) -> Case {
    Case {
        name,
        shape,
        start: None,
        empty_batch: false,
    }
}

#[wasm_bindgen_test]
async fn plain() {
    check(
        case("N=37 D=24", Shape::new(1, 2, 37, 24)),
        variant("plain", false, false, NONE),
        1,
    )
    .await;
}

#[wasm_bindgen_test]
async fn temperature() {
    let c = Switches {
        tau: true,
        alpha: true,
        ..NONE
    };
    check(
        case("Nq<Nk D=32", Shape::new(1, 2, 29, 32).with_q_len(5)),
        variant("tau+alpha", true, false, c),
        2,
    )
    .await;
}

#[wasm_bindgen_test]
async fn gate() {
    let c = Switches { gate: true, ..NONE };
    check(
        case("N=19 D=16", Shape::new(1, 2, 19, 16)),
        variant("gate", false, false, c),
        3,
    )
    .await;
}

#[wasm_bindgen_test]
async fn selective() {
    check(
        case("N=70 D=16 (3+ query tiles)", Shape::new(1, 2, 70, 16)),
        variant("selective", true, true, NONE),
        4,
    )
    .await;
}

#[wasm_bindgen_test]
async fn kv_len_with_an_empty_row() {
    // Batch element 0 gets kv_len = 0: zeros and LSE = -inf, written without an infinity in
    // the shader.
    let c = Switches {
        kv_len: true,
        ..NONE
    };
    check(
        Case {
            name: "B=2 kv_len[0]=0",
            shape: Shape::new(2, 2, 23, 32),
            start: None,
            empty_batch: true,
        },
        variant("kv_len", true, false, c),
        5,
    )
    .await;
}

#[wasm_bindgen_test]
async fn gqa_everything() {
    check(
        Case {
            name: "GQA 4:1",
            shape: Shape::new(2, 4, 19, 32).with_kv_heads(1),
            start: None,
            empty_batch: true,
        },
        variant("full", true, true, Switches::ALL),
        6,
    )
    .await;
}
