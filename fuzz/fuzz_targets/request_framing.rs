//! Fuzzes the request framer and classifier (`resp::request`,
//! `resp::command`): never a panic, the same requests and errors whether the
//! bytes arrive in one piece or cut anywhere, frames within the buffer and
//! always progressing, and the same results as an independent rendering of
//! Redis' grammar. The checks are in `tests/fuzz_checks/mod.rs`.

#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_checks::check_request_input(data);
});
