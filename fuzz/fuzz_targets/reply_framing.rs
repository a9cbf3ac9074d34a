//! Fuzzes the reply scanner (`resp::reply`): never a panic, the same frames
//! whether the bytes arrive in one piece or cut anywhere (with the caller
//! dropping scanned bytes or not), and, wherever `redis-protocol` decodes a
//! valid RESP2/RESP3 reply, the frame ends where it says. The checks are in
//! `tests/fuzz_checks/mod.rs`.

#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_checks::check_reply_input(data);
});
