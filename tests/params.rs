//! `kernels::Params` matches its WGSL mirror in `shaders/common.wgsl` field for field, as naga
//! lays it out (the uniform of the forward, coop, selective and backward kernels), and
//! `kernels::backward::Layout` its mirrors in `shaders/backward.wgsl` and `shaders/coop_backward.wgsl`.

use selattn::kernels::{Params, Source};
use selattn::DType;
use std::mem::{offset_of, size_of};

/// The WGSL of a source; the cooperative-matrix backward template expanded for one head dim.
fn text_of(src: Source) -> String {
    use selattn::kernels::coop_backward::{CoopBackwardConfig, CoopEntry};
    let text = src.text(DType::F16).unwrap();
    if src != Source::CoopBackward {
        return text;
    }
    CoopBackwardConfig {
        entry: CoopEntry::Dkv,
        d: 64,
        bt: 32,
        ct: 16,
        sgs: 32,
        sgbar: false,
        prefetch: false,
        quads: false,
        sdq: false,
        fq: false,
        kv4: false,
        rq: false,
        dup: false,
        pipe: false,
        features: selattn::Switches::NONE,
    }
    .wgsl(&text)
}

#[test]
fn params_match_wgsl_layout() {
    let want = [
        ("batch", offset_of!(Params, batch)),
        ("q_heads", offset_of!(Params, q_heads)),
        ("kv_heads", offset_of!(Params, kv_heads)),
        ("q_len", offset_of!(Params, q_len)),
        ("k_len", offset_of!(Params, k_len)),
        ("group", offset_of!(Params, group)),
        ("start", offset_of!(Params, start)),
        ("sel_head", offset_of!(Params, sel_head)),
        ("scale", offset_of!(Params, scale)),
        ("n_qtiles", offset_of!(Params, n_qtiles)),
        ("sel_rows", offset_of!(Params, sel_rows)),
        ("_pad1", offset_of!(Params, _pad1)),
    ];
    for src in [
        Source::Forward,
        Source::Selective,
        Source::Backward,
        Source::CoopBackward,
    ] {
        let module = naga::front::wgsl::parse_str(&text_of(src)).unwrap();
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .unwrap_or_else(|| panic!("Params not in {src:?}"));
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("Params is not a struct in {src:?}");
        };
        assert_eq!(*span as usize, size_of::<Params>(), "{src:?}: size");
        let got: Vec<(String, usize)> = members
            .iter()
            .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
            .collect();
        let want: Vec<(String, usize)> = want.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(got, want, "{src:?}: fields");
    }
}

#[test]
fn backward_layout_matches_wgsl_layout() {
    use selattn::kernels::backward::Layout;
    let want = [
        ("lse", offset_of!(Layout, lse)),
        ("delta", offset_of!(Layout, delta)),
        ("tau", offset_of!(Layout, tau)),
        ("alpha", offset_of!(Layout, alpha)),
        ("gate", offset_of!(Layout, gate)),
        ("valid", offset_of!(Layout, valid)),
        ("g", offset_of!(Layout, g)),
        ("dt", offset_of!(Layout, dt)),
        ("dgate", offset_of!(Layout, dgate)),
        ("df0", offset_of!(Layout, df0)),
        ("dqb", offset_of!(Layout, dqb)),
        ("dkb", offset_of!(Layout, dkb)),
        ("flags", offset_of!(Layout, flags)),
        ("n_lin", offset_of!(Layout, n_lin)),
        ("row_lo", offset_of!(Layout, row_lo)),
        ("row_hi", offset_of!(Layout, row_hi)),
    ];
    // The scalar and the cooperative-matrix backward share the workspace: both mirror Layout.
    for src in [Source::Backward, Source::CoopBackward] {
        let module = naga::front::wgsl::parse_str(&text_of(src)).unwrap();
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Layout"))
            .unwrap_or_else(|| panic!("Layout in {src:?}"));
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("Layout is not a struct in {src:?}");
        };
        assert_eq!(*span as usize, size_of::<Layout>(), "{src:?}: size");
        let got: Vec<(String, usize)> = members
            .iter()
            .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
            .collect();
        let want: Vec<(String, usize)> = want.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(got, want, "{src:?}: fields");
    }
}
