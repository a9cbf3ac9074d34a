//! The passthrough hot path allocates nothing per command: framing and
//! classifying requests, queueing what each expects, scanning replies and
//! pairing them. A counting global allocator (this test binary only) checks
//! that allocations do not grow with the number of commands.

// A global allocator cannot be written without `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use cachefence::resp::command::{Command, ReplyMode};
use cachefence::resp::reply::ReplyScanner;
use cachefence::resp::request::RequestFramer;
use cachefence::session::{Expect, Pairing, Route};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Runs `commands` pipelined GET/SET requests and their replies through
/// the framing and pairing code, as one session would, in batches of 100.
fn pass_through(commands: usize, requests: &[u8], replies: &[u8], per_batch: usize) {
    let mut framer = RequestFramer::new(512 << 20);
    let mut scanner = ReplyScanner::default();
    let mut pairing = Pairing::default();
    let mut mode = ReplyMode::On;
    let (mut framed, mut paired) = (0, 0);
    while framed < commands {
        let mut at = 0;
        while let Some(frame) = framer.next(&requests[at..]).unwrap() {
            let command = Command::classify(&frame, &requests[at..at + frame.len]);
            pairing.push(Expect::for_command(command, &mut mode).unwrap());
            at += frame.len;
            framed += 1;
        }
        while let Some(frame) = scanner.advance(replies).unwrap() {
            assert_eq!(
                pairing.route(frame.kind, &replies[frame.start..frame.end]),
                Route::Reply
            );
            paired += 1;
        }
        scanner.consume(replies.len());
        assert_eq!(paired, framed);
    }
    assert_eq!(framed, commands);
    assert_eq!(commands % per_batch, 0);
}

#[test]
fn passthrough_allocations_do_not_grow_with_commands() {
    let per_batch = 100;
    let mut requests = Vec::new();
    let mut replies = Vec::new();
    for i in 0..per_batch / 2 {
        requests.extend(format!("*2\r\n$3\r\nGET\r\n$6\r\nkey:{i:02}\r\n").bytes());
        replies.extend(b"$5\r\nvalue\r\n");
        requests.extend(format!("*3\r\n$3\r\nSET\r\n$6\r\nkey:{i:02}\r\n$5\r\nvalue\r\n").bytes());
        replies.extend(b"+OK\r\n");
    }
    let measure = |commands| {
        let before = allocations();
        pass_through(commands, &requests, &replies, per_batch);
        allocations() - before
    };
    let small = measure(1_000);
    let large = measure(100_000);
    // The only allocations are the reused queue and stack growing to their
    // steady size: a handful, the same for 1 000 and for 100 000 commands.
    assert!(small <= 8, "{small} allocations for 1 000 commands");
    assert_eq!(large, small, "allocations grew with the number of commands");
}
