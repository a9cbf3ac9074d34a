//! Fenced writes asked about first: a pipelined run of ticketless writes
//! sends one `MGET` of its fences, and the writes whose fences do not exist
//! go to Redis as the client sent them, without the fence script (#17).
//!
//! A script call costs Redis several times a plain `SET` (its fixed cost,
//! `TIME`, Lua around every command: `bench/fence_script_cost.py`), and
//! most writes find no fence: a fence lives only while a miss is
//! outstanding, a herd lease is held or the lag window keeps an
//! invalidation time (fence.lua `bump`).
//!
//! Why a write sent plain after the probe found no fence is safe (C1),
//! across proxies too. Every ticket is a miss recorded in the fence, or a
//! lease token naming its version. So, for a key the probe found without a
//! fence:
//! - a miss before the probe was filled or refused already, or it is older
//!   than `lease_ttl` (its fill is refused anyway); its read is not newer
//!   than the write, which lands after it and wins;
//! - a miss after the probe reads the database after the client sent the
//!   write, which the application sends after its own database write: the
//!   value it reads is not older than this write.
//!
//! Nothing in between needs the fence moved. What still needs the script:
//! a key whose fence exists (a fill, or a write that must refuse the fills
//! of outstanding misses), a key under a lag window (the invalidation time
//! is recorded even without a miss), a `SET` this proxy saw missed lately
//! (likely a fill, and a lost fence must refuse it), `on_write = "reject"`.
//!
//! The probe costs one round trip, and the connection's later requests wait
//! for it (their order against the writes is kept), so only runs of at
//! least [`PROBE_MIN_OPS`] writes are probed: a lone write at a time goes
//! to the script as before.

use bytes::Bytes;

use super::plan::COMMAND_AT;
use super::script::{ScriptCall, batch};
use super::translate::ScriptReply;
use crate::resp::encode::{command_of, command_words};
use crate::resp::request::string2ll;
use crate::resp::value::Value;

/// The fewest ticketless writes in a run that are worth a probe.
pub const PROBE_MIN_OPS: usize = 2;
/// The most fences one probe asks about (an `MSET` of many keys is one
/// write of many fences): past it the run goes to the script.
pub const PROBE_MAX_FENCES: usize = 256;

/// How a write sent without the script answers its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainKind {
    /// A plain store (`SET`, `SETEX`, `PSETEX`) under `on_write = "write"`:
    /// the command's own reply, counted as a write.
    SetWrite,
    /// A plain store under `on_write = "invalidate"`, sent as `DEL key`:
    /// `+OK`, counted as an invalidation.
    SetInval,
    /// A `write` or `inval` call's command (a write, `DEL`, `UNLINK`,
    /// `GETDEL`, or the `DEL` an `MSET` became): its reply as the script
    /// would have returned it.
    Command,
}

/// A write's form without the script: the command (the client's own bytes
/// where it runs as sent), and the fences that must not exist for it to go
/// so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    pub command: Bytes,
    pub kind: PlainKind,
    pub fences: Vec<Bytes>,
}

impl Plain {
    /// The plain form of a fence script call, if it has one: a `set`
    /// without a lag window, a recent miss here or `reject`; a `write` or
    /// `inval` that creates no fence. `sent` is the client's request. The
    /// argument layouts are fence.lua's (see [`super::plan`]).
    pub fn of(call: &ScriptCall, reply: &ScriptReply, sent: Bytes) -> Option<Plain> {
        let args = &call.args;
        match &args.first()?[..] {
            b"set" => {
                let (lag, missed_here, on_write) = (args.get(4)?, args.get(7)?, args.get(8)?);
                if &lag[..] != b"0" || &missed_here[..] != b"0" {
                    return None;
                }
                let key = call.keys.first()?;
                let (command, kind) = match &on_write[..] {
                    b"write" => (sent, PlainKind::SetWrite),
                    b"inval" => (crate::resp::encode::command(&[b"DEL", key]), PlainKind::SetInval),
                    _ => return None,
                };
                let fences = vec![call.keys.get(1)?.clone()];
                Some(Plain {
                    command,
                    kind,
                    fences,
                })
            }
            b"write" | b"inval" => {
                let fenced: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
                if &args.get(3)?[..] != b"0" || fenced == 0 || fenced > call.keys.len() {
                    return None;
                }
                let words = args.get(COMMAND_AT..).filter(|w| !w.is_empty())?;
                // A store turned into a delete runs that delete; anything
                // else the client's command as sent.
                let command = match reply {
                    ScriptReply::Ok { .. } => encode(words),
                    _ => sent,
                };
                Some(Plain {
                    command,
                    kind: PlainKind::Command,
                    fences: call.keys[call.keys.len() - fenced..].to_vec(),
                })
            }
            _ => None,
        }
    }
}

fn encode(words: &[Bytes]) -> Bytes {
    command_words(words)
}

/// One write of a probed run: its script call and reply rule, and its plain
/// form if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOp {
    pub call: ScriptCall,
    pub reply: ScriptReply,
    pub plain: Option<Plain>,
}

/// A run of writes waiting for the `MGET` of their fences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ops: Vec<ProbeOp>,
    /// Bytes of the client's requests the run keeps (counted once: the
    /// session asks when it holds the run and when it lets it go).
    weight: usize,
}

/// How a probed run goes on, in the run's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// One write, as the client sent it (or the `DEL` it became).
    Plain {
        command: Bytes,
        kind: PlainKind,
        reply: ScriptReply,
    },
    /// Writes in a row that need the script: one call, or a batch of them.
    Script { call: ScriptCall, reply: ScriptReply },
}

impl Probe {
    /// A probe of the run, if it is worth one: at least [`PROBE_MIN_OPS`]
    /// writes with a plain form, and at most [`PROBE_MAX_FENCES`] fences
    /// to ask about. `sent` holds each write's request as the client sent
    /// it. The calls and replies are taken out of the vectors (which keep
    /// their room, for the next run); without a probe they stay there.
    pub fn of(
        calls: &mut Vec<ScriptCall>,
        replies: &mut Vec<ScriptReply>,
        sent: impl Iterator<Item = Bytes>,
    ) -> Option<Probe> {
        let plains: Vec<Option<Plain>> = calls
            .iter()
            .zip(replies.iter())
            .zip(sent)
            .map(|((call, reply), sent)| Plain::of(call, reply, sent))
            .collect();
        let eligible = plains.iter().flatten().count();
        let fences: usize = plains.iter().flatten().map(|p| p.fences.len()).sum();
        if eligible < PROBE_MIN_OPS || fences > PROBE_MAX_FENCES {
            return None;
        }
        let ops: Vec<ProbeOp> = calls
            .drain(..)
            .zip(replies.drain(..))
            .zip(plains)
            .map(|((call, reply), plain)| ProbeOp { call, reply, plain })
            .collect();
        let weight = ops.iter().map(|op| op.call.weight()).sum();
        Some(Probe { ops, weight })
    }

    /// The `MGET` of every fence the plain forms name, in order.
    pub fn request(&self) -> Bytes {
        command_of(std::iter::once(Bytes::from_static(b"MGET")).chain(self.fences().cloned()))
    }

    fn fences(&self) -> impl Iterator<Item = &Bytes> {
        self.ops
            .iter()
            .flat_map(|op| op.plain.iter().flat_map(|p| p.fences.iter()))
    }

    /// The writes as they go on, given the `MGET` reply: plain where every
    /// fence of the write was missing, the script for the rest (in a row:
    /// one batch call). Anything but an array of one element per fence (an
    /// error: `-LOADING`, `-NOPERM`…) sends every write to the script,
    /// which then meets the error itself.
    pub fn steps(self, frame: &[u8], resp3: bool) -> Vec<Step> {
        let asked = self.fences().count();
        let missing: Vec<bool> = match scan_missing(frame, asked) {
            Some(missing) => missing,
            None => match Value::decode(frame, resp3) {
                Some(Value::Array(items)) if items.len() == asked => {
                    items.iter().map(|v| *v == Value::Nil).collect()
                }
                _ => vec![false; asked],
            },
        };
        let mut at = 0;
        // At most a step per write (most often that: writes find no fence).
        let mut steps = Vec::with_capacity(self.ops.len());
        let mut scripted: Vec<(ScriptCall, ScriptReply)> = Vec::new();
        for op in self.ops {
            let plain = op.plain.filter(|plain| {
                let all_missing = missing[at..at + plain.fences.len()].iter().all(|m| *m);
                at += plain.fences.len();
                all_missing
            });
            match plain {
                Some(plain) => {
                    flush_scripted(&mut scripted, &mut steps);
                    steps.push(Step::Plain {
                        command: plain.command,
                        kind: plain.kind,
                        reply: op.reply,
                    });
                }
                None => scripted.push((op.call, op.reply)),
            }
        }
        flush_scripted(&mut scripted, &mut steps);
        steps
    }

    /// How many client replies the run owes.
    pub fn replies(&self) -> usize {
        self.ops.len()
    }

    /// The keys the run's invalidations delete (for retries when the
    /// upstream is lost before they ran).
    pub fn invalidated_keys(&self) -> Option<Vec<Bytes>> {
        let keys: Vec<Bytes> = self
            .ops
            .iter()
            .filter_map(|op| op.reply.invalidated_keys())
            .flatten()
            .collect();
        (!keys.is_empty()).then_some(keys)
    }

    /// Bytes of the client's requests the run keeps.
    pub fn weight(&self) -> usize {
        self.weight
    }
}

/// Which fences an `MGET` reply of `asked` elements found missing, read
/// straight off the frame when it is the usual array of nils (`$-1`,
/// RESP3 `_`) and bulks; `None` for anything else, which is decoded in full.
fn scan_missing(frame: &[u8], asked: usize) -> Option<Vec<bool>> {
    fn line(frame: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = at + memchr::memchr(b'\r', frame.get(at..)?)?;
        (frame.get(end + 1) == Some(&b'\n')).then(|| (&frame[at..end], end + 2))
    }
    fn number(digits: &[u8]) -> Option<usize> {
        usize::try_from(string2ll(digits)?).ok()
    }
    let (header, mut at) = line(frame, 0)?;
    if header.first() != Some(&b'*') || number(&header[1..])? != asked {
        return None;
    }
    let mut missing = Vec::with_capacity(asked);
    for _ in 0..asked {
        let (head, next) = line(frame, at)?;
        at = match head {
            b"$-1" | b"_" => {
                missing.push(true);
                next
            }
            [b'$', len @ ..] => {
                missing.push(false);
                let end = next.checked_add(number(len)?)?;
                let after = end.checked_add(2)?;
                (frame.get(end..after)? == b"\r\n").then_some(after)?
            }
            _ => return None,
        };
    }
    (at == frame.len()).then_some(missing)
}

fn flush_scripted(scripted: &mut Vec<(ScriptCall, ScriptReply)>, steps: &mut Vec<Step>) {
    match scripted.len() {
        0 => {}
        1 => {
            let (call, reply) = scripted.pop().expect("one");
            steps.push(Step::Script { call, reply });
        }
        _ => {
            let (calls, replies): (Vec<ScriptCall>, Vec<ScriptReply>) = scripted.drain(..).unzip();
            steps.push(Step::Script {
                call: batch(&calls),
                reply: ScriptReply::Batch(replies),
            });
        }
    }
}

#[cfg(test)]
mod tests;
