//! Fuzz target `iptables_save`: see docs/fuzzing.md and the property function
//! `props::iptables_save` (shared with metaguard-core's corpus test).
#![no_main]

#[path = "../../crates/metaguard-core/tests/fuzz/props.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::iptables_save(data));
