//! Arbitrary bytes as a whole segment: header validation, then a drain of the
//! ring with forged counters, cursor and commit words, then record decoding.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringside_shm_protocol::fuzzing::segment_bytes(data);
});
