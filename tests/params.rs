//! `kernels::Params` matches its WGSL mirror in `shaders/common.wgsl` field for field, as naga
//! lays it out (the uniform of the forward, coop and selective kernels).

use selattn::kernels::{Params, Source};
use selattn::DType;
use std::mem::{offset_of, size_of};

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
        ("_pad0", offset_of!(Params, _pad0)),
        ("_pad1", offset_of!(Params, _pad1)),
    ];
    for src in [Source::Forward, Source::Selective] {
        let text = src.text(DType::F32).unwrap();
        let module = naga::front::wgsl::parse_str(&text).unwrap();
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
