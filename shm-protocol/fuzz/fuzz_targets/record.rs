//! Arbitrary bytes as one record copied out of the ring.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringside_shm_protocol::fuzzing::record_bytes(data);
});
