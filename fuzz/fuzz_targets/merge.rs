//! Fuzz target `merge`: see docs/fuzzing.md and the property function
//! `props::merge` (shared with metaguard-core's corpus test).
#![no_main]

#[path = "../../crates/metaguard-core/tests/fuzz/props.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::merge(data));
