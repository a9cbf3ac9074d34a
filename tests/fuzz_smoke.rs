//! The fuzz targets' invariants (`tests/fuzz_checks/mod.rs`, the very code
//! the libFuzzer targets of `fuzz/` run) in the ordinary test suite, without
//! libFuzzer: every seed of `fuzz/corpus/<target>/`, then a bounded number
//! of mutated seeds from a fixed random seed, so a run is repeatable.
//!
//! `FUZZ_SMOKE_INPUTS` (mutated inputs per target, default 50 000) and
//! `FUZZ_SMOKE_SEED` (default 1) change the run. A failing input is printed
//! escaped and in hex; saved to a file it replays in the fuzz target
//! (`cargo fuzz run <target> <file>`, see fuzz/README.md).

mod fuzz_checks;

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;

use fuzz_checks::{Consume, Input, RequestEnd, check_replies, check_requests, oracle_reply_len};

/// splitmix64: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Tokens of both grammars that random byte flips rarely produce.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"*",
    b"$",
    b"+",
    b"-",
    b":",
    b"%",
    b"~",
    b">",
    b"|",
    b"_",
    b",",
    b"#",
    b"(",
    b"!",
    b"=",
    b";",
    b".",
    b"?",
    b"-1",
    b"0",
    b"1",
    b"\"",
    b"'",
    b"\\x4",
    b"\\",
    b" ",
    b"9223372036854775807",
    b"2147483648",
    b"65536",
    b"*?\r\n",
    b"$?\r\n",
    b";0\r\n",
    b".\r\n",
    b"|1\r\n",
    b"*1\r\n$4\r\nPING\r\n",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            // The control byte and cut points: a new way to cut.
            0 if len > 0 => data[0] = rng.next() as u8,
            1 if len > 1 => {
                let at = 1 + rng.below((len - 1).min(8));
                data[at] = rng.next() as u8;
            }
            2 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                data[at] = rng.next() as u8;
            }
            4 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(16)).min(len);
                data.drain(from..to);
            }
            5 if len > 0 => {
                // Duplicate a piece (pipelines, nested aggregates).
                let from = rng.below(len);
                let to = (from + 1 + rng.below(64)).min(len);
                let piece = data[from..to].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, piece);
            }
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                let at = rng.below(len + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            7 => data.truncate(rng.below(len + 1)),
            _ => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(len + 1);
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data.truncate(4096);
    data
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (python3 fuzz/seed.py makes it)", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).expect("seed")).collect();
    assert!(
        seeds.len() >= 50,
        "only {} seeds in {}",
        seeds.len(),
        dir.display()
    );
    seeds
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on every seed and on mutated seeds; on a failure, names the
/// input before passing the panic on.
fn smoke(target: &str, check: fn(&[u8])) {
    let seeds = seeds(target);
    let inputs = env_number("FUZZ_SMOKE_INPUTS", 50_000);
    let mut rng = Rng(env_number("FUZZ_SMOKE_SEED", 1));
    let mutated = (0..inputs).map(|_| mutate(&mut rng, &seeds));
    for (i, data) in seeds.iter().cloned().chain(mutated).enumerate() {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let kind = if i < seeds.len() { "seed" } else { "mutated input" };
            eprintln!(
                "{target}: {kind} #{i} fails:\n  escaped: \"{}\"\n  hex: {}",
                data.escape_ascii(),
                data.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            resume_unwind(panic);
        }
    }
}

#[test]
fn request_framing_invariants_hold_on_seeds_and_mutations() {
    smoke("request_framing", |data| {
        fuzz_checks::check_request_input(data);
    });
}

#[test]
fn reply_framing_invariants_hold_on_seeds_and_mutations() {
    smoke("reply_framing", |data| {
        fuzz_checks::check_reply_input(data);
    });
}

/// The checks are not vacuous: the oracle recognises valid replies (and
/// only those), and the request reference agrees on a known pipeline.
#[test]
fn the_checks_see_what_they_should() {
    let valid: &[&[u8]] = &[
        b"+OK\r\n",
        b"$-1\r\n",
        b"*2\r\n$3\r\nfoo\r\n:-7\r\n",
        b"%1\r\n+a\r\n_\r\n",
        b"|1\r\n+ttl\r\n:3\r\n*1\r\n,1.5\r\n",
        b">2\r\n$7\r\nmessage\r\n#t\r\n",
        b"$?\r\n;2\r\nab\r\n;0\r\n",
        b"*?\r\n:1\r\n~?\r\n.\r\n.\r\n",
    ];
    for reply in valid {
        assert_eq!(
            oracle_reply_len(reply),
            Some(reply.len()),
            "{}",
            reply.escape_ascii()
        );
        let run = check_replies(reply, &[1], Consume::Scanned);
        assert_eq!(run.frames.len(), 1);
    }
    let invalid: &[&[u8]] = &[
        b"+a\nb\r\n",
        b"$+3\r\nabc\r\n",
        b";3\r\nabc\r\n",
        b"$?\r\n.\r\n",
        b"*?\r\n;0\r\n",
        b"*1\r\n",
        b"HELLO 3\r\n",
    ];
    for reply in invalid {
        assert_eq!(oracle_reply_len(reply), None, "{}", reply.escape_ascii());
    }
    // Most reply seeds, recorded from Redis, are valid replies: a broken
    // oracle (never Some) would go unnoticed otherwise.
    let seeds = seeds("reply_framing");
    let confirmed = seeds
        .iter()
        .filter(|s| oracle_reply_len(Input::parse(s).payload).is_some())
        .count();
    assert!(
        confirmed * 2 > seeds.len(),
        "{confirmed} of {} seeds",
        seeds.len()
    );

    let pipeline = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING x\r\n*0\r\n*1\r\n$3\r\nfoo";
    let run = check_requests(pipeline, &[3, 20], 1 << 20, true);
    let lens: Vec<usize> = run.frames.iter().map(|f| f.len).collect();
    assert_eq!(lens, vec![20, 8, 4]);
    assert_eq!(
        run.end,
        RequestEnd::Incomplete {
            at: 32,
            partial_len: 8,
            partial_name: None
        }
    );
}
