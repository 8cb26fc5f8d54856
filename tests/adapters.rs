//! Every adapter wgpu finds is either usable (a device can be requested on it) or listed with
//! the reason it is not; never a panic. The GPU tests run on every usable one
//! (`common::contexts`).

use selattn::{Context, Error};

#[test]
fn every_adapter_is_usable_or_has_a_reason() {
    let mut failures = vec![];
    let mut usable = 0;
    for (adapter, why) in selattn::adapters() {
        let info = adapter.get_info();
        let name = format!(
            "{} ({:?}, {} {})",
            info.name, info.backend, info.driver, info.driver_info
        );
        match (why, Context::from_adapter(&adapter)) {
            (None, Ok(_)) => {
                usable += 1;
                eprintln!("usable: {name}");
            }
            (None, Err(e)) => failures.push(format!(
                "{name}: no reason given, but requesting a device failed: {e}"
            )),
            (Some(r), Err(Error::NoAdapter { reasons })) if !r.is_empty() => {
                eprintln!("unusable: {name}: {r}");
                if reasons != vec![r.clone()] {
                    failures.push(format!("{name}: reason {r:?}, device error {reasons:?}"));
                }
            }
            (Some(r), other) => failures.push(format!(
                "{name}: listed unusable ({r:?}) but from_adapter gave {:?}",
                other.map(|c| c.describe())
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        usable > 0,
        "no adapter can run compute: install mesa-vulkan-drivers"
    );
}
