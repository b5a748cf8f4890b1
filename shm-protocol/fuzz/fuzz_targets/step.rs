//! Arbitrary bytes as one step record copied out of the step ring.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringside_shm_protocol::fuzzing::step_bytes(data);
});
