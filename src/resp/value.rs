//! Decoding of the few replies the proxy must read (its own script calls),
//! with `redis-protocol`, into one small value type for RESP2 and RESP3.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use redis_protocol::resp3::types::{BytesFrame as Resp3Frame, FrameMap};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Int(i64),
    Bulk(Bytes),
    Status(Bytes),
    Error(Bytes),
    Bool(bool),
    Array(Vec<Value>),
}

/// Deepest frame [`Value::decode`] decodes: the replies the proxy reads
/// (its scripts', `EXEC`'s, `KEYS`/`SCAN`) are shallow.
pub const DECODE_DEPTH: usize = 64;

impl Value {
    /// Decodes one complete frame; `None` for one nested deeper than
    /// [`DECODE_DEPTH`] (the decoder recurses per level), which callers
    /// pass on as it is.
    pub fn decode(frame: &[u8], resp3: bool) -> Option<Value> {
        // Every aggregate header takes at least 4 bytes (`*1\r\n`): a frame
        // shorter than that many levels cannot be too deep, and the proxy's
        // own script replies (the miss path) are, so they skip the scan.
        if frame.len() > 4 * DECODE_DEPTH
            && !matches!(
                crate::resp::reply::ReplyScanner::with_max_depth(DECODE_DEPTH).advance(frame),
                Ok(Some(_))
            )
        {
            return None;
        }
        let buf = Bytes::copy_from_slice(frame);
        if resp3 {
            let (frame, _) = redis_protocol::resp3::decode::complete::decode_bytes(&buf).ok()??;
            Some(from_resp3(frame))
        } else {
            let (frame, _) = redis_protocol::resp2::decode::decode_bytes(&buf).ok()??;
            Some(from_resp2(frame))
        }
    }

    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Bulk(b) | Value::Status(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            Value::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

fn from_resp2(frame: Resp2Frame) -> Value {
    match frame {
        Resp2Frame::SimpleString(s) => Value::Status(s),
        Resp2Frame::Error(e) => Value::Error(Bytes::from(e.to_string())),
        Resp2Frame::Integer(n) => Value::Int(n),
        Resp2Frame::BulkString(b) => Value::Bulk(b),
        Resp2Frame::Array(items) => Value::Array(items.into_iter().map(from_resp2).collect()),
        Resp2Frame::Null => Value::Nil,
    }
}

fn from_resp3(frame: Resp3Frame) -> Value {
    match frame {
        Resp3Frame::BlobString { data, .. } | Resp3Frame::VerbatimString { data, .. } => Value::Bulk(data),
        Resp3Frame::SimpleString { data, .. } => Value::Status(data),
        Resp3Frame::SimpleError { data, .. } => Value::Error(Bytes::from(data.to_string())),
        Resp3Frame::BlobError { data, .. } => Value::Error(data),
        Resp3Frame::Number { data, .. } => Value::Int(data),
        Resp3Frame::Boolean { data, .. } => Value::Bool(data),
        Resp3Frame::Null => Value::Nil,
        Resp3Frame::Array { data, .. } | Resp3Frame::Push { data, .. } => {
            Value::Array(data.into_iter().map(from_resp3).collect())
        }
        other => Value::Bulk(Bytes::from(format!("{other:?}"))),
    }
}

/// A reply the proxy builds itself, encoded for the connection's protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Bytes),
    Status(&'static str),
    Error(String),
    Array(Vec<Reply>),
    /// A map in RESP3, a flat array of pairs in RESP2.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn encode(&self, resp3: bool) -> Bytes {
        let mut buf = BytesMut::new();
        if resp3 {
            redis_protocol::resp3::encode::complete::extend_encode(&mut buf, &self.to_resp3(), false)
                .expect("encoding into a growable buffer cannot fail");
        } else {
            redis_protocol::resp2::encode::extend_encode(&mut buf, &self.to_resp2(), false)
                .expect("encoding into a growable buffer cannot fail");
        }
        buf.freeze()
    }

    fn to_resp2(&self) -> Resp2Frame {
        match self {
            Reply::Nil => Resp2Frame::Null,
            Reply::Int(n) => Resp2Frame::Integer(*n),
            Reply::Bulk(b) => Resp2Frame::BulkString(b.clone()),
            Reply::Status(s) => Resp2Frame::SimpleString(Bytes::from_static(s.as_bytes())),
            Reply::Error(e) => Resp2Frame::Error(e.as_str().into()),
            Reply::Array(items) => Resp2Frame::Array(items.iter().map(Reply::to_resp2).collect()),
            Reply::Map(pairs) => Resp2Frame::Array(
                pairs
                    .iter()
                    .flat_map(|(k, v)| [k.to_resp2(), v.to_resp2()])
                    .collect(),
            ),
        }
    }

    fn to_resp3(&self) -> Resp3Frame {
        match self {
            Reply::Nil => Resp3Frame::Null,
            Reply::Int(n) => Resp3Frame::Number {
                data: *n,
                attributes: None,
            },
            Reply::Bulk(b) => Resp3Frame::BlobString {
                data: b.clone(),
                attributes: None,
            },
            Reply::Status(s) => Resp3Frame::SimpleString {
                data: Bytes::from_static(s.as_bytes()),
                attributes: None,
            },
            Reply::Error(e) => Resp3Frame::SimpleError {
                data: e.as_str().into(),
                attributes: None,
            },
            Reply::Array(items) => Resp3Frame::Array {
                data: items.iter().map(Reply::to_resp3).collect(),
                attributes: None,
            },
            Reply::Map(pairs) => {
                let mut map = FrameMap::default();
                for (k, v) in pairs {
                    map.insert(k.to_resp3(), v.to_resp3());
                }
                Resp3Frame::Map {
                    data: map,
                    attributes: None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_deeper_than_decode_depth_is_not_decoded() {
        let nested = |depth: usize| [&b"*1\r\n".repeat(depth)[..], b":1\r\n"].concat();
        let shallow = Value::decode(&nested(DECODE_DEPTH - 1), false);
        assert!(matches!(shallow, Some(Value::Array(_))));
        assert_eq!(Value::decode(&nested(DECODE_DEPTH + 1), false), None);
        assert_eq!(Value::decode(&nested(8000), true), None);
    }

    #[test]
    fn own_replies_follow_the_protocol() {
        assert_eq!(&Reply::Nil.encode(false)[..], b"$-1\r\n");
        assert_eq!(&Reply::Nil.encode(true)[..], b"_\r\n");
        let map = Reply::Map(vec![(Reply::Bulk("a".into()), Reply::Int(1))]);
        assert_eq!(&map.encode(false)[..], b"*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(&map.encode(true)[..], b"%1\r\n$1\r\na\r\n:1\r\n");
    }

    #[test]
    fn script_replies_decode_in_both_protocols() {
        let v = Value::decode(b"*3\r\n:0\r\n$2\r\n17\r\n$-1\r\n", false).unwrap();
        assert_eq!(
            v,
            Value::Array(vec![Value::Int(0), Value::Bulk("17".into()), Value::Nil])
        );
        let v = Value::decode(b"*2\r\n:1\r\n#f\r\n", true).unwrap();
        assert_eq!(v, Value::Array(vec![Value::Int(1), Value::Bool(false)]));
    }
}
