//! Arbitrary bytes as a whole segment: header validation, then a drain of the
//! ring with forged counters, cursor and commit words, then record decoding,
//! then a snapshot of the in-flight table (forged claims, seq words and
//! entries) and a claim / update / release on it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringside_shm_protocol::fuzzing::segment_bytes(data);
});
