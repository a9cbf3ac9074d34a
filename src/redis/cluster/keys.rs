//! Where a command's keys are, and the hash slot of a key (Redis Cluster).
//!
//! The positions come from the cluster's own `COMMAND` reply (first key,
//! last key, step, and the subcommands of container commands such as
//! `OBJECT`), so commands of any Redis version are routed as that Redis
//! would. Commands whose keys move with their arguments (`movablekeys`)
//! are read by the rules Redis documents for them: `numkeys` (`EVAL`,
//! `FCALL`, `ZUNIONSTORE`, `SINTERCARD`, `LMPOP` …) and `STREAMS`
//! (`XREAD`, `XREADGROUP`); any other falls back to its first key.

use std::collections::HashMap;

use bytes::Bytes;

use crate::resp::value::Value;

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = match crc & 0x8000 {
                0 => crc << 1,
                _ => (crc << 1) ^ 0x1021,
            };
        }
    }
    crc
}

/// The hash slot of `key`: of its `{tag}` if it has a non-empty one.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(close) if close > 0 => &key[open + 1..open + 1 + close],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS as u16
}

/// Key positions of one command (Redis' legacy triple).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spec {
    first: i64,
    last: i64,
    step: i64,
    movable: bool,
}

/// Key positions by command name (lower case; `container|sub` for
/// subcommands).
#[derive(Debug, Default)]
pub struct KeyTable {
    specs: HashMap<Vec<u8>, Spec>,
}

impl KeyTable {
    /// The table of a `COMMAND` reply (`None`: not that shape).
    pub fn from_command_reply(reply: &Value) -> Option<KeyTable> {
        let Value::Array(commands) = reply else {
            return None;
        };
        let mut table = KeyTable::default();
        for command in commands {
            table.add(command);
        }
        (!table.specs.is_empty()).then_some(table)
    }

    fn add(&mut self, command: &Value) {
        let Value::Array(fields) = command else {
            return;
        };
        let (Some(Value::Bulk(name) | Value::Status(name)), Some(flags), Some(Value::Int(first))) =
            (fields.first(), fields.get(2), fields.get(3))
        else {
            return;
        };
        let int = |i: usize| match fields.get(i) {
            Some(Value::Int(n)) => *n,
            _ => 0,
        };
        let movable = match flags {
            Value::Array(flags) => flags
                .iter()
                .any(|f| f.as_bytes().is_some_and(|f| &f[..] == b"movablekeys")),
            _ => false,
        };
        let spec = Spec {
            first: *first,
            last: int(4),
            step: int(5),
            movable,
        };
        self.specs.insert(name.to_ascii_lowercase(), spec);
        if let Some(Value::Array(subcommands)) = fields.get(9) {
            for sub in subcommands {
                self.add(sub);
            }
        }
    }

    /// The indices of `args`' keys (`args[0]` is the command name); empty
    /// for a keyless command or one the table does not know.
    pub fn keys(&self, args: &[Bytes]) -> Vec<usize> {
        let Some(name) = args.first() else {
            return Vec::new();
        };
        let name = name.to_ascii_lowercase();
        if let Some(keys) = movable_keys(&name, args) {
            return keys;
        }
        let spec = match self.specs.get(&name) {
            Some(spec) if spec.first == 0 && args.len() > 1 => {
                let mut full = name.clone();
                full.push(b'|');
                full.extend(args[1].to_ascii_lowercase());
                match self.specs.get(&full) {
                    Some(sub) => *sub,
                    None => return Vec::new(),
                }
            }
            Some(spec) => *spec,
            None => return Vec::new(),
        };
        legacy_keys(spec, args.len())
    }
}

/// The keys of a first/last/step triple among `argc` arguments.
fn legacy_keys(spec: Spec, argc: usize) -> Vec<usize> {
    if spec.first <= 0 {
        return Vec::new();
    }
    let argc = argc as i64;
    let last = match spec.last {
        n if n < 0 => argc + n,
        n => n.min(argc - 1),
    };
    let step = spec.step.max(1);
    let mut keys = Vec::new();
    let mut i = spec.first;
    while i <= last && i < argc {
        keys.push(i as usize);
        i += step;
    }
    // A movable command whose keys the rules below do not read: its first
    // key only (MIGRATE, SORT …).
    if spec.movable {
        keys.truncate(1);
    }
    keys
}

/// Keys of the `movablekeys` commands routed by their documented rule.
fn movable_keys(name: &[u8], args: &[Bytes]) -> Option<Vec<usize>> {
    let numkeys_at = match name {
        b"eval" | b"evalsha" | b"eval_ro" | b"evalsha_ro" | b"fcall" | b"fcall_ro" => 2,
        b"zunionstore" | b"zinterstore" | b"zdiffstore" => 2,
        b"zunion" | b"zinter" | b"zdiff" | b"zintercard" | b"sintercard" | b"lmpop" | b"zmpop" => 1,
        b"blmpop" | b"bzmpop" => 2,
        b"xread" | b"xreadgroup" => {
            let streams = args.iter().position(|a| a.eq_ignore_ascii_case(b"streams"))?;
            let rest = args.len() - streams - 1;
            return Some((streams + 1..streams + 1 + rest / 2).collect());
        }
        _ => return None,
    };
    let numkeys: usize = std::str::from_utf8(args.get(numkeys_at)?).ok()?.parse().ok()?;
    let first = numkeys_at + 1;
    let mut keys: Vec<usize> = (first..(first + numkeys).min(args.len())).collect();
    // The destination of the *STORE commands is a key too.
    if matches!(name, b"zunionstore" | b"zinterstore" | b"zdiffstore") {
        keys.insert(0, 1);
    }
    Some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<Bytes> {
        line.split(' ')
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    fn entry(name: &str, first: i64, last: i64, step: i64, movable: bool) -> Value {
        let flags = match movable {
            true => vec![Value::Status(Bytes::from_static(b"movablekeys"))],
            false => vec![],
        };
        Value::Array(vec![
            Value::Bulk(Bytes::copy_from_slice(name.as_bytes())),
            Value::Int(-2),
            Value::Array(flags),
            Value::Int(first),
            Value::Int(last),
            Value::Int(step),
        ])
    }

    fn table() -> KeyTable {
        let mut object = match entry("object", 0, 0, 0, false) {
            Value::Array(fields) => fields,
            _ => unreachable!(),
        };
        object.extend([Value::Nil, Value::Nil, Value::Nil]);
        object.push(Value::Array(vec![entry("object|encoding", 2, 2, 1, false)]));
        KeyTable::from_command_reply(&Value::Array(vec![
            entry("get", 1, 1, 1, false),
            entry("mset", 1, -1, 2, false),
            entry("del", 1, -1, 1, false),
            entry("ping", 0, 0, 0, false),
            entry("eval", 0, 0, 0, true),
            entry("sort", 1, 1, 1, true),
            entry("xread", 0, 0, 0, true),
            Value::Array(object),
        ]))
        .expect("a table")
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Values from `CLUSTER KEYSLOT` of Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"user:{42}:name"), slot(b"42"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        // An empty tag hashes the whole key.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn keys_are_found_as_redis_finds_them() {
        let table = table();
        assert_eq!(table.keys(&args("GET k")), vec![1]);
        assert_eq!(table.keys(&args("MSET a 1 b 2 c 3")), vec![1, 3, 5]);
        assert_eq!(table.keys(&args("DEL a b c")), vec![1, 2, 3]);
        assert_eq!(table.keys(&args("PING")), Vec::<usize>::new());
        assert_eq!(table.keys(&args("EVALSHA abc 2 k1 k2 a1")), vec![3, 4]);
        assert_eq!(table.keys(&args("eval s 0 a1")), Vec::<usize>::new());
        assert_eq!(table.keys(&args("SORT k BY w GET x")), vec![1]);
        assert_eq!(table.keys(&args("XREAD COUNT 2 STREAMS s1 s2 0 0")), vec![4, 5]);
        assert_eq!(table.keys(&args("OBJECT ENCODING k")), vec![2]);
        assert_eq!(table.keys(&args("OBJECT HELP")), Vec::<usize>::new());
        assert_eq!(table.keys(&args("ZUNIONSTORE d 2 a b")), vec![1, 3, 4]);
        assert_eq!(table.keys(&args("UNKNOWN k")), Vec::<usize>::new());
        // A numkeys past the end takes what is there.
        assert_eq!(table.keys(&args("EVALSHA abc 5 k1")), vec![3]);
    }
}
