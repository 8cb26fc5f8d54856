//! Tests of the f64 reference backward (`selattn::reference_backward::backward`), DESIGN.md §1b.
//!
//! The gradients are checked two independent ways:
//! * directional central differences of the f64 forward: for a random direction u of one input X,
//!   `L(X + εu) - L(X - εu)` must equal `<dL/dX, X₊ - X₋>` where `L = sum(dO·O) + sum(dF_out·F_out)`
//!   and X₊, X₋ are the perturbed inputs as f32 (the difference is taken of the f32 values actually
//!   used, so f32 rounding of the perturbation cancels; what remains is O(ε³) and O(ε·ulp));
//! * the chunk rule: a sequence run backward in chunks, last to first, each chunk's dF0 fed to the
//!   chunk before as its dF_out, gives the gradients of the whole run.

use selattn::reference::{attention, HostInputs};
use selattn::reference_backward::{backward, HostGrads};
use selattn::Switches;
use selattn::{Options, Shape, Spec};
use selattn_tools::testing::Rng;

mod common;
use common::backward::backward_data;
use common::chunks::{chunks_backward, chunks_forward};

fn spec(s: &Shape, o: &Options, x: &HostInputs) -> Spec {
    Spec {
        shape: *s,
        options: *o,
        present: x.present(o.selective.is_some()),
    }
}

/// `sum(dO·O) + sum(dF_out·F_out)` in f64.
fn loss(s: &Shape, o: &Options, x: &HostInputs, d_o: &[f32], df_out: Option<&[f32]>) -> f64 {
    let out = attention(&spec(s, o, x), x).unwrap();
    let mut l: f64 = out.o.iter().zip(d_o).map(|(a, &b)| a * b as f64).sum();
    if let Some(df) = df_out {
        l += out
            .f_out
            .iter()
            .zip(df)
            .map(|(a, &b)| a * b as f64)
            .sum::<f64>();
    }
    l
}

/// The inputs that can be differentiated, by name.
const FIELDS: [&str; 7] = ["q", "k", "v", "tau", "alpha", "gate", "f0"];

fn field<'a>(x: &'a mut HostInputs, name: &str) -> Option<&'a mut Vec<f32>> {
    match name {
        "q" => Some(&mut x.q),
        "k" => Some(&mut x.k),
        "v" => Some(&mut x.v),
        "tau" => x.tau.as_mut(),
        "alpha" => x.alpha.as_mut(),
        "gate" => x.gate.as_mut(),
        "f0" => x.f0.as_mut(),
        _ => None,
    }
}

fn grad<'a>(g: &'a HostGrads, name: &str) -> &'a [f64] {
    match name {
        "q" => &g.dq,
        "k" => &g.dk,
        "v" => &g.dv,
        "tau" => &g.dtau,
        "alpha" => &g.dalpha,
        "gate" => &g.dgate,
        "f0" => &g.df0,
        _ => &[],
    }
}

struct Case {
    name: &'static str,
    shape: Shape,
    opts: Options,
    x: HostInputs,
    d_o: Vec<f32>,
    df_out: Option<Vec<f32>>,
}

fn case(
    name: &'static str,
    shape: Shape,
    opts: Options,
    c: Switches,
    f0: bool,
    df_out: bool,
    seed: u64,
) -> Case {
    let (x, d_o, df_out) = backward_data(&shape, c, f0, df_out, seed, seed + 7777);
    Case {
        name,
        shape,
        opts,
        x,
        d_o,
        df_out,
    }
}

// Long on purpose: a table of cases.
fn cases() -> Vec<Case> {
    let all = Switches::ALL;
    let none = Switches::NONE;
    let no_kvlen = Switches {
        kv_len: false,
        ..Switches::ALL
    };
    let sel = |h| Options::causal().selective(h);
    let mut v = vec![
        case(
            "full plain",
            Shape::new(1, 2, 5, 8),
            Options::new(),
            none,
            false,
            false,
            1,
        ),
        case(
            "full, every control, GQA 2:1, Nq < Nk",
            Shape::new(2, 4, 9, 8).with_kv_heads(2).with_q_len(6),
            Options::new(),
            all,
            false,
            false,
            2,
        ),
        case(
            "causal, start in the middle, scale",
            Shape::new(2, 2, 11, 16).with_q_len(4),
            Options::causal().start(3).scale(0.4),
            no_kvlen,
            false,
            false,
            3,
        ),
        case(
            "causal, every control",
            Shape::new(2, 3, 7, 8),
            Options::causal(),
            all,
            false,
            false,
            4,
        ),
        case(
            "selective head 0",
            Shape::new(1, 2, 9, 8),
            sel(0),
            none,
            false,
            true,
            5,
        ),
        case(
            "selective head 3, GQA 2:1, F0, dF_out, every control",
            Shape::new(2, 4, 10, 8).with_kv_heads(2),
            sel(3),
            all,
            true,
            true,
            6,
        ),
        case(
            "selective head 1, start, F0, no dF_out",
            Shape::new(1, 2, 12, 8).with_q_len(5),
            sel(1).start(4),
            no_kvlen,
            true,
            false,
            7,
        ),
        case(
            "selective MQA head 2, Nq < Nk default start",
            Shape::new(1, 3, 11, 16).with_kv_heads(1).with_q_len(7),
            sel(2),
            all,
            true,
            true,
            8,
        ),
    ];
    // Rows with no allowed key (kv_len 0 in batch 1) and padding with selective masking.
    let mut c = case(
        "selective, kv_len [6, 0]",
        Shape::new(2, 2, 9, 8),
        sel(1),
        all,
        true,
        true,
        9,
    );
    c.x.kv_len = Some(vec![6, 0]);
    v.push(c);
    let mut c = case(
        "full, kv_len [0, 4]",
        Shape::new(2, 2, 5, 8),
        Options::new(),
        all,
        false,
        false,
        10,
    );
    c.x.kv_len = Some(vec![0, 4]);
    v.push(c);
    v
}

#[test]
fn gradients_match_central_differences() {
    let eps = 1e-5f64;
    let mut failures = vec![];
    let mut checked = 0;
    for c in cases() {
        let g = backward(
            &spec(&c.shape, &c.opts, &c.x),
            &c.x,
            &c.d_o,
            c.df_out.as_deref(),
        )
        .unwrap();
        for (n, name) in FIELDS.iter().enumerate() {
            let mut xp = c.x.clone();
            let mut xm = c.x.clone();
            let Some(base) = field(&mut c.x.clone(), name).cloned() else {
                continue;
            };
            let mut rng = Rng::new(100 + n as u64);
            let u = rng.normals(base.len());
            let plus: Vec<f32> = base
                .iter()
                .zip(&u)
                .map(|(&b, &u)| (b as f64 + eps * u as f64) as f32)
                .collect();
            let minus: Vec<f32> = base
                .iter()
                .zip(&u)
                .map(|(&b, &u)| (b as f64 - eps * u as f64) as f32)
                .collect();
            *field(&mut xp, name).unwrap() = plus.clone();
            *field(&mut xm, name).unwrap() = minus.clone();
            let lp = loss(&c.shape, &c.opts, &xp, &c.d_o, c.df_out.as_deref());
            let lm = loss(&c.shape, &c.opts, &xm, &c.d_o, c.df_out.as_deref());
            let gr = grad(&g, name);
            assert_eq!(gr.len(), base.len(), "{}: d{name} length", c.name);
            let want: f64 = gr
                .iter()
                .zip(plus.iter().zip(&minus))
                .map(|(g, (&p, &m))| g * (p as f64 - m as f64))
                .sum();
            let got = lp - lm;
            // Scale of the terms: sum |g| |Δ|, so cancellation in the dot product cannot hide an error.
            let mag: f64 = gr
                .iter()
                .zip(plus.iter().zip(&minus))
                .map(|(g, (&p, &m))| (g * (p as f64 - m as f64)).abs())
                .sum();
            let err = (got - want).abs();
            eprintln!(
                "{}: d{name} finite difference {got:.6e}, gradient {want:.6e}, |err| {err:.2e} (scale {mag:.2e})",
                c.name
            );
            checked += 1;
            // NaN must fail too, hence `is_nan`.
            if err.is_nan()
                || err > 1e-6 * mag + 1e-13
                || mag == 0.0 && gr.iter().any(|&g| g != 0.0)
            {
                failures.push(format!("{}: d{name} err {err:.3e} of {mag:.3e}", c.name));
            }
        }
    }
    assert!(checked >= 40, "only {checked} directional checks ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rows_without_allowed_keys_give_zero_gradients() {
    // kv_len 0 in batch 1: no row of batch 1 has an allowed key.
    let shape = Shape::new(2, 2, 6, 8);
    let mut c = case(
        "",
        shape,
        Options::causal().selective(1),
        Switches::ALL,
        true,
        true,
        21,
    );
    c.x.kv_len = Some(vec![4, 0]);
    let g = backward(
        &spec(&shape, &c.opts, &c.x),
        &c.x,
        &c.d_o,
        c.df_out.as_deref(),
    )
    .unwrap();
    let (hq, nq, nk, d) = (2usize, 6usize, 6usize, 8usize);
    let half = |v: &[f64], n: usize| v[v.len() / 2..].iter().all(|&x| x == 0.0) && v.len() == 2 * n;
    assert!(half(&g.dq, hq * nq * d), "dq of batch 1");
    assert!(half(&g.dk, hq * nk * d), "dk of batch 1");
    assert!(half(&g.dv, hq * nk * d), "dv of batch 1");
    assert!(half(&g.dtau, hq * nq), "dtau of batch 1");
    assert!(half(&g.dgate, hq * nk), "dgate of batch 1");
    // dF0 of batch 1 is dF_out passed straight through (no row adds to F there).
    let dfo = c.df_out.unwrap();
    for j in 0..nk {
        assert_eq!(g.df0[nk + j], dfo[nk + j] as f64, "dF0 of batch 1, key {j}");
    }
    // Batch 0 has gradients.
    assert!(g.dq[..hq * nq * d].iter().any(|&x| x != 0.0));
    assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
}

/// Chunked backward equals the backward of the whole: chunks run forward first to first, threading
/// F_out into the next F0, then backward last to first, each passing its dF0 (first keys) to the
/// chunk before as dF_out; dK, dV, dgate, dalpha add up over chunks, dQ and dtau are per chunk, and
/// dF0 of a key comes from the first chunk that sees it.
#[test]
fn chunked_backward_equals_whole() {
    let shape = Shape::new(2, 4, 13, 8).with_kv_heads(2);
    let opts = Options::causal().selective(3);
    let c = case("", shape, opts, Switches::ALL, true, true, 31);
    let mut x = c.x.clone();
    x.kv_len = Some(vec![13, 8]);
    let whole = backward(&spec(&shape, &opts, &x), &x, &c.d_o, c.df_out.as_deref()).unwrap();
    for bounds in [vec![0, 5, 6, 13], vec![0, 1, 7, 10, 13]] {
        // Forward: each chunk's inputs, F0 threaded through in f64 (kept in f32 inputs: F values
        // here are sums of a few relu'd logits, the f32 rounding is part of the tolerance).
        let chunks = chunks_forward(&shape, &opts, &x, &bounds, |c| {
            let out = attention(&spec(&c.shape, &c.opts, &c.x), &c.x).unwrap();
            out.f_out.iter().map(|&v| v as f32).collect()
        });
        // Backward, last chunk first.
        let df_out = c.df_out.as_deref().unwrap();
        let acc = chunks_backward(&shape, &chunks, &c.d_o, df_out, |c, d_o, df_out| {
            backward(&spec(&c.shape, &c.opts, &c.x), &c.x, &d_o, Some(&df_out)).unwrap()
        });
        for (what, got, want) in [
            ("dq", &acc.dq, &whole.dq),
            ("dk", &acc.dk, &whole.dk),
            ("dv", &acc.dv, &whole.dv),
            ("dtau", &acc.dtau, &whole.dtau),
            ("dalpha", &acc.dalpha, &whole.dalpha),
            ("dgate", &acc.dgate, &whole.dgate),
            ("df0", &acc.df0, &whole.df0),
        ] {
            let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, 0.0f64);
            for (a, w) in got.iter().zip(want.iter()) {
                num += (a - w) * (a - w);
                den += w * w;
                worst = worst.max((a - w).abs());
            }
            let rel = (num / den).sqrt();
            eprintln!("chunks {bounds:?}: {what} max err {worst:.2e}, rel {rel:.2e}");
            assert!(den > 0.0, "{what} is all zero");
            // F and dF_out pass between chunks as f32: relative error of order 1e-7.
            assert!(rel < 1e-6, "chunks {bounds:?}: {what} rel {rel:.3e}");
        }
    }
}
