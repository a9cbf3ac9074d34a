//! The reply buffer: what goes to the client, in order. While nothing is
//! held, replies are ranges of the read buffer, written without a copy; a
//! reply that waits for the proxy's own script call (a miss) holds every
//! later reply behind it, so the client sees Redis' order.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;

use super::{READ_CHUNK, send};

/// What goes to the client, in order: ranges of the read buffer while
/// nothing is held, and replies held behind one that waits for the proxy's
/// own script call.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    pieces: Vec<Piece>,
    held: VecDeque<Held>,
    /// Entries ever released from the front of `held`: a slot's number is
    /// its absolute position, so finding it costs nothing.
    released: u64,
    /// A closing reply is queued: close once everything before it is out.
    pub(super) closing: bool,
    /// Where several pieces are gathered into one write.
    gathered: BytesMut,
}

#[derive(Debug)]
enum Piece {
    Range(Range<usize>),
    Bytes(Bytes),
}

#[derive(Debug)]
enum Held {
    Ready(Bytes),
    /// What Redis sent, released as it is if the proxy's own call can no
    /// longer answer (see [`Outbox::release_waiting`]).
    Waiting(Bytes),
}

impl Outbox {
    /// A frame of the read buffer goes to the client as is.
    pub(super) fn forward(&mut self, buf: &[u8], range: Range<usize>) {
        if !self.held.is_empty() {
            self.held
                .push_back(Held::Ready(Bytes::copy_from_slice(&buf[range])));
        } else if let Some(Piece::Range(last)) = self.pieces.last_mut()
            && last.end == range.start
        {
            last.end = range.end;
        } else {
            self.pieces.push(Piece::Range(range));
        }
    }

    /// Bytes of the proxy's own take the place of a frame.
    pub(super) fn send(&mut self, bytes: Bytes) {
        if self.held.is_empty() {
            self.pieces.push(Piece::Bytes(bytes));
        } else {
            self.held.push_back(Held::Ready(bytes));
        }
    }

    /// A reply that must wait: everything after it is held too.
    /// `fallback` is what Redis sent in its place.
    pub(super) fn hold(&mut self, fallback: Bytes) -> u64 {
        let slot = self.released + self.held.len() as u64;
        self.held.push_back(Held::Waiting(fallback));
        slot
    }

    /// Releases every waiting reply as Redis sent it: the connection became
    /// a replication link, on which the proxy's own calls cannot go.
    pub(super) fn release_waiting(&mut self) {
        for entry in &mut self.held {
            if let Held::Waiting(fallback) = entry {
                *entry = Held::Ready(std::mem::take(fallback));
            }
        }
        self.resolve(u64::MAX, Bytes::new());
    }

    /// The held reply is known; releases what is no longer blocked.
    pub(super) fn resolve(&mut self, slot: u64, bytes: Bytes) {
        let index = slot
            .checked_sub(self.released)
            .and_then(|i| usize::try_from(i).ok());
        if let Some(entry @ Held::Waiting(_)) = index.and_then(|i| self.held.get_mut(i)) {
            *entry = Held::Ready(bytes);
        }
        while let Some(Held::Ready(_)) = self.held.front() {
            if let Some(Held::Ready(bytes)) = self.held.pop_front() {
                self.released += 1;
                self.pieces.push(Piece::Bytes(bytes));
            }
        }
    }

    pub(super) fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Writes the pieces: one range as it is (the passthrough case, no
    /// copy), several gathered into one write.
    pub(super) async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        client: &mut W,
        buf: &[u8],
    ) -> std::io::Result<()> {
        match self.pieces.as_slice() {
            [] => return Ok(()),
            [Piece::Range(range)] => send(client, &buf[range.clone()]).await?,
            [Piece::Bytes(bytes)] => send(client, bytes).await?,
            pieces => {
                self.gathered.clear();
                for piece in pieces {
                    match piece {
                        Piece::Range(range) => self.gathered.extend_from_slice(&buf[range.clone()]),
                        Piece::Bytes(bytes) => self.gathered.extend_from_slice(bytes),
                    }
                }
                send(client, &self.gathered).await?;
                // Do not keep a large one-off buffer for the connection's life.
                if self.gathered.capacity() > 4 * READ_CHUNK {
                    self.gathered = BytesMut::new();
                }
            }
        }
        self.pieces.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one `write` sends.
    async fn written(outbox: &mut Outbox, buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        outbox.write(&mut out, buf).await.expect("writing to a Vec");
        out
    }

    #[tokio::test]
    async fn adjacent_ranges_merge_into_one_write_without_a_copy() {
        let buf = b"+OK\r\n:1\r\n$1\r\nx\r\n";
        let mut outbox = Outbox::default();
        outbox.forward(buf, 0..5);
        outbox.forward(buf, 5..9);
        outbox.forward(buf, 9..16);
        assert!(matches!(outbox.pieces.as_slice(), [Piece::Range(r)] if *r == (0..16)));
        assert_eq!(written(&mut outbox, buf).await, buf);
        assert_eq!(written(&mut outbox, buf).await, b"");
    }

    #[tokio::test]
    async fn a_held_reply_holds_everything_after_it_until_resolved() {
        let buf = b":1\r\n:3\r\n:4\r\n";
        let mut outbox = Outbox::default();
        outbox.forward(buf, 0..4);
        let slot = outbox.hold(Bytes::new());
        outbox.forward(buf, 4..8);
        outbox.send(Bytes::from_static(b"+local\r\n"));
        assert!(outbox.is_holding());
        assert_eq!(written(&mut outbox, buf).await, b":1\r\n");
        outbox.resolve(slot, Bytes::from_static(b"$-1\r\n"));
        assert!(!outbox.is_holding());
        outbox.forward(buf, 8..12);
        assert_eq!(written(&mut outbox, buf).await, b"$-1\r\n:3\r\n+local\r\n:4\r\n");
    }

    #[tokio::test]
    async fn held_replies_resolved_out_of_order_come_out_in_order() {
        let mut outbox = Outbox::default();
        let first = outbox.hold(Bytes::new());
        let second = outbox.hold(Bytes::new());
        outbox.resolve(second, Bytes::from_static(b":2\r\n"));
        assert_eq!(written(&mut outbox, b"").await, b"");
        outbox.resolve(first, Bytes::from_static(b":1\r\n"));
        assert_eq!(written(&mut outbox, b"").await, b":1\r\n:2\r\n");
        // A slot resolved twice, or never held, changes nothing.
        outbox.resolve(first, Bytes::from_static(b":9\r\n"));
        outbox.resolve(99, Bytes::from_static(b":9\r\n"));
        assert_eq!(written(&mut outbox, b"").await, b"");
        // Slots keep counting from where they were.
        let third = outbox.hold(Bytes::new());
        assert_eq!(third, 2);
    }

    #[tokio::test]
    async fn waiting_replies_can_be_released_as_redis_sent_them() {
        let mut outbox = Outbox::default();
        outbox.hold(Bytes::from_static(b"$-1\r\n"));
        outbox.send(Bytes::from_static(b"+OK\r\n"));
        outbox.hold(Bytes::from_static(b"*1\r\n$-1\r\n"));
        outbox.release_waiting();
        assert!(!outbox.is_holding());
        assert_eq!(written(&mut outbox, b"").await, b"$-1\r\n+OK\r\n*1\r\n$-1\r\n");
    }
}
