//! PostgreSQL's `pgoutput` logical replication messages (protocol version 1,
//! the "Logical Replication Message Formats" of the PostgreSQL manual), as
//! `pg_logical_slot_peek_binary_changes` returns them: one message per row.
//!
//! [`decode`] is pure and refuses anything it does not fully understand
//! (a short message, an unknown type or column kind, bytes left over), so a
//! change is never half-read. [`Relations`] is the relation cache: the
//! server sends a Relation message before the first change to a table in
//! every decoding call, and a tuple means nothing without it. It turns
//! tuple data into a JSON object by column name, typed by the column's type
//! OID (see [`column_value`]).

use std::collections::HashMap;

use serde_json::{Map, Value};

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    Begin(Begin),
    Commit(Commit),
    /// The transaction came from another node through replication origin `name`.
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    /// A non-built-in type used by a relation's columns.
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    /// `old` is the key (`K`) or the whole old row (`O`) when the table's
    /// replica identity gives it, else `None`.
    Update {
        relation: u32,
        old: Option<OldRow>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldRow,
    },
    Truncate {
        cascade: bool,
        restart_identity: bool,
        relations: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`); sent only
    /// when the `messages` option is on, which Dovetail does not ask for.
    Logical {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Begin {
    /// The LSN of the transaction's commit record (its start).
    pub final_lsn: u64,
    /// Microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Commit {
    pub flags: u8,
    /// Where the commit record starts: a slot confirmed up to here still
    /// decodes this transaction again.
    pub commit_lsn: u64,
    /// Where the commit record ends (the row's `lsn` in the SQL interface):
    /// a slot confirmed up to here has consumed exactly this transaction.
    pub end_lsn: u64,
    pub commit_time: i64,
}

/// A table's shape, as of the change that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `relreplident`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old values an update or delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OldRow {
    /// The replica identity key's columns (the others are sent as null).
    Key(Tuple),
    /// The whole old row (`REPLICA IDENTITY FULL`).
    Full(Tuple),
}

pub(crate) type Tuple = Vec<Datum>;

/// One column of tuple data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Datum {
    Null,
    /// An unchanged TOASTed value: the server did not send it.
    Unchanged,
    /// The type's text output, in the database's encoding.
    Text(Vec<u8>),
    /// The type's binary output (only with the `binary` option).
    Binary(Vec<u8>),
}

/// Why bytes are not a `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("the message is empty")]
    Empty,
    #[error("unknown message type {0:?}")]
    UnknownType(char),
    #[error("the {what} message ends early (at byte {at})")]
    Truncated { what: &'static str, at: usize },
    #[error("a string in the {what} message has no terminating NUL")]
    Unterminated { what: &'static str },
    #[error("the {what} message has {found:?} at byte {at} where {expected} was expected")]
    Unexpected { what: &'static str, expected: &'static str, found: char, at: usize },
    #[error("the {what} message has a negative count or length ({value}) at byte {at}")]
    Negative { what: &'static str, value: i64, at: usize },
    #[error("{extra} bytes are left over after the {what} message")]
    Trailing { what: &'static str, extra: usize },
}

/// Decodes one `pgoutput` message (protocol version 1, not streamed).
pub(crate) fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let (&tag, _) = data.split_first().ok_or(DecodeError::Empty)?;
    let what = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        other => return Err(DecodeError::UnknownType(char::from(other))),
    };
    let mut r = Reader { buf: data, pos: 1, what };
    let message = match tag {
        b'B' => Message::Begin(Begin { final_lsn: r.u64()?, commit_time: r.i64()?, xid: r.u32()? }),
        b'C' => {
            Message::Commit(Commit { flags: r.u8()?, commit_lsn: r.u64()?, end_lsn: r.u64()?, commit_time: r.i64()? })
        }
        b'O' => Message::Origin { commit_lsn: r.u64()?, name: r.string()? },
        b'R' => {
            let (oid, namespace, name, replica_identity) = (r.u32()?, r.string()?, r.string()?, r.u8()?);
            let n = r.count16()?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                columns.push(Column {
                    key: r.u8()? & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation { oid, namespace, name, replica_identity, columns })
        }
        b'Y' => Message::Type { oid: r.u32()?, namespace: r.string()?, name: r.string()? },
        b'I' => {
            let relation = r.u32()?;
            r.expect(b'N', "N (the new tuple)")?;
            Message::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.peek()? {
                b'K' => {
                    r.pos += 1;
                    Some(OldRow::Key(r.tuple()?))
                }
                b'O' => {
                    r.pos += 1;
                    Some(OldRow::Full(r.tuple()?))
                }
                _ => None,
            };
            r.expect(b'N', "N (the new tuple)")?;
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32()?;
            let at = r.pos;
            let old = match r.u8()? {
                b'K' => OldRow::Key(r.tuple()?),
                b'O' => OldRow::Full(r.tuple()?),
                other => {
                    return Err(DecodeError::Unexpected {
                        what,
                        expected: "K or O (the old key or row)",
                        found: char::from(other),
                        at,
                    });
                }
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let n = r.count32()?;
            let options = r.u8()?;
            // Never trust a count for an allocation: at most what the bytes can hold.
            let mut relations = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { cascade: options & 1 == 1, restart_identity: options & 2 == 2, relations }
        }
        _ => {
            let transactional = r.u8()? & 1 == 1;
            let (lsn, prefix) = (r.u64()?, r.string()?);
            let len = r.count32()?;
            Message::Logical { transactional, lsn, prefix, content: r.bytes(len)?.to_vec() }
        }
    };
    r.finish()?;
    Ok(message)
}

/// A cursor over one message; every read checks the length.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(DecodeError::Truncated { what: self.what, at: self.buf.len() });
        };
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn peek(&self) -> Result<u8, DecodeError> {
        self.buf.get(self.pos).copied().ok_or(DecodeError::Truncated { what: self.what, at: self.pos })
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn count16(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| DecodeError::Negative { what: self.what, value: n.into(), at })
    }

    fn count32(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| DecodeError::Negative { what: self.what, value: n.into(), at })
    }

    /// A NUL-terminated string. Names are read leniently (a byte that is not
    /// UTF-8 becomes U+FFFD) rather than refusing the change.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0).ok_or(DecodeError::Unterminated { what: self.what })?;
        let s = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.pos += len + 1;
        Ok(s)
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        match self.u8()? {
            b if b == byte => Ok(()),
            other => Err(DecodeError::Unexpected { what: self.what, expected, found: char::from(other), at }),
        }
    }

    /// TupleData: a column count, then per column `n`, `u`, or `t`/`b` with a length and the bytes.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.count16()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.pos;
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.count32()?;
                    Datum::Text(self.bytes(len)?.to_vec())
                }
                b'b' => {
                    let len = self.count32()?;
                    Datum::Binary(self.bytes(len)?.to_vec())
                }
                other => {
                    return Err(DecodeError::Unexpected {
                        what: self.what,
                        expected: "a column kind (n, u, t or b)",
                        found: char::from(other),
                        at,
                    });
                }
            });
        }
        Ok(out)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { what: self.what, extra }),
        }
    }
}

/// Why tuple data cannot be read with the relations known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RowError {
    #[error("a change to relation OID {0} came before its Relation message")]
    UnknownRelation(u32),
    #[error("a change to {table} has {found} columns where its Relation message has {expected}")]
    ColumnCount { table: String, expected: usize, found: usize },
}

/// A tuple as JSON: present columns by name, and the names of unchanged
/// TOASTed columns, which are left out of `values`.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Row {
    pub values: Map<String, Value>,
    pub unchanged: Vec<String>,
}

/// The relation cache: the latest Relation message per relation OID.
#[derive(Debug, Default)]
pub(crate) struct Relations {
    by_oid: HashMap<u32, Relation>,
}

impl Relations {
    /// Remembers `relation`, replacing what was known of it (its columns may have changed).
    pub fn remember(&mut self, relation: Relation) {
        self.by_oid.insert(relation.oid, relation);
    }

    pub fn get(&self, oid: u32) -> Result<&Relation, RowError> {
        self.by_oid.get(&oid).ok_or(RowError::UnknownRelation(oid))
    }
}

impl Relation {
    /// `schema.table` (just `table` for `pg_catalog`, whose namespace is not sent).
    pub fn qualified_name(&self) -> String {
        if self.namespace.is_empty() { self.name.clone() } else { format!("{}.{}", self.namespace, self.name) }
    }

    /// Every column of `tuple` by name.
    pub fn row(&self, tuple: &Tuple) -> Result<Row, RowError> {
        self.row_where(tuple, |_| true)
    }

    /// Only the replica identity key's columns of `tuple` (a `K` tuple
    /// sends the others as null, which says nothing).
    pub fn key(&self, tuple: &Tuple) -> Result<Row, RowError> {
        self.row_where(tuple, |c| c.key)
    }

    fn row_where(&self, tuple: &Tuple, keep: impl Fn(&Column) -> bool) -> Result<Row, RowError> {
        if tuple.len() != self.columns.len() {
            return Err(RowError::ColumnCount {
                table: self.qualified_name(),
                expected: self.columns.len(),
                found: tuple.len(),
            });
        }
        let mut row = Row::default();
        for (column, datum) in self.columns.iter().zip(tuple).filter(|(c, _)| keep(c)) {
            let value = match datum {
                Datum::Null => Value::Null,
                Datum::Unchanged => {
                    row.unchanged.push(column.name.clone());
                    continue;
                }
                Datum::Text(bytes) => column_value(column.type_oid, &String::from_utf8_lossy(bytes)),
                Datum::Binary(bytes) => Value::String(format!("\\x{}", hex::encode(bytes))),
            };
            row.values.insert(column.name.clone(), value);
        }
        Ok(row)
    }
}

/// Built-in type OIDs (`pg_type.oid`, fixed in PostgreSQL's catalog).
mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// A column's text as JSON, by its type: booleans as `true`/`false`,
/// integers as numbers, floats and numerics as numbers when the number
/// written is the same value (else, like `NaN`, `Infinity` or a numeric of
/// more than 15 significant digits, the text), json and jsonb parsed;
/// every other type as the text the server sent.
pub(crate) fn column_value(type_oid: u32, text: &str) -> Value {
    let as_text = || Value::String(text.to_string());
    match type_oid {
        oid::BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => as_text(),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text.parse::<i64>().map_or_else(|_| as_text(), Value::from),
        oid::FLOAT4 | oid::FLOAT8 => {
            text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or_else(as_text, Value::Number)
        }
        oid::NUMERIC => numeric_value(text).unwrap_or_else(as_text),
        oid::JSON | oid::JSONB => serde_json::from_str(text).unwrap_or_else(|_| as_text()),
        _ => as_text(),
    }
}

/// A numeric's text as a JSON number, if that loses nothing: a whole number
/// that fits i64 (`5.00` as `5`), or a decimal of at most 15 significant digits
/// (which an f64 holds and writes back as the same decimal value) within
/// f64's normal range. `None` for anything else (`NaN`, `Infinity`, more
/// digits).
fn numeric_value(text: &str) -> Option<Value> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::from(i));
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let plain = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !plain(int) || !plain(frac) {
        return None;
    }
    // A whole number written with a scale (`5.00`): the integer.
    let sign = if text.starts_with('-') { "-" } else { "" };
    if frac.bytes().all(|b| b == b'0')
        && let Ok(i) = format!("{sign}{int}").parse::<i64>()
    {
        return Some(Value::from(i));
    }
    let int = int.trim_start_matches('0');
    let all = format!("{int}{frac}");
    let significant = all.trim_start_matches('0').trim_end_matches('0');
    // Orders of magnitude well inside f64's normal range (1e-307 to 1e308).
    let leading_zeros = if int.is_empty() { frac.len() - frac.trim_start_matches('0').len() } else { 0 };
    if significant.len() > 15 || int.len() > 300 || leading_zeros > 290 {
        return None;
    }
    text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Builds messages the way the server writes them (big-endian, NUL-terminated strings).
    #[derive(Default)]
    struct Bytes(Vec<u8>);

    impl Bytes {
        fn tag(t: u8) -> Bytes {
            Bytes(vec![t])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.extend(s.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, s: &str) -> Self {
            let mut b = self.u8(b't').i32(s.len() as i32);
            b.0.extend(s.as_bytes());
            b
        }
        fn done(self) -> Vec<u8> {
            self.0
        }
    }

    fn orders_relation() -> Vec<u8> {
        Bytes::tag(b'R')
            .u32(16_390)
            .str("public")
            .str("orders")
            .u8(b'd')
            .i16(4)
            .u8(1)
            .str("id")
            .u32(oid::INT8)
            .i32(-1)
            .u8(0)
            .str("total")
            .u32(oid::NUMERIC)
            .i32(655_366)
            .u8(0)
            .str("doc")
            .u32(oid::JSONB)
            .i32(-1)
            .u8(0)
            .str("note")
            .u32(25)
            .i32(-1)
            .done()
    }

    fn relation() -> Relation {
        match decode(&orders_relation()) {
            Ok(Message::Relation(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn begin_and_commit() {
        let begin = Bytes::tag(b'B').u64(0x1DC_5080).u64(767_000_000_000_000).u32(746).done();
        assert_eq!(
            decode(&begin),
            Ok(Message::Begin(Begin { final_lsn: 0x1DC_5080, commit_time: 767_000_000_000_000, xid: 746 }))
        );
        let commit = Bytes::tag(b'C').u8(0).u64(0x1DC_5080).u64(0x1DC_50B0).u64(767_000_000_000_000).done();
        assert_eq!(
            decode(&commit),
            Ok(Message::Commit(Commit {
                flags: 0,
                commit_lsn: 0x1DC_5080,
                end_lsn: 0x1DC_50B0,
                commit_time: 767_000_000_000_000
            }))
        );
    }

    #[test]
    fn origin_and_type() {
        let origin = Bytes::tag(b'O').u64(42).str("node_a").done();
        assert_eq!(decode(&origin), Ok(Message::Origin { commit_lsn: 42, name: "node_a".into() }));
        let ty = Bytes::tag(b'Y').u32(16_400).str("public").str("mood").done();
        assert_eq!(decode(&ty), Ok(Message::Type { oid: 16_400, namespace: "public".into(), name: "mood".into() }));
    }

    #[test]
    fn relation_columns_and_key_flags() {
        let r = relation();
        assert_eq!((r.oid, r.qualified_name(), r.replica_identity), (16_390, "public.orders".to_string(), b'd'));
        let names: Vec<_> = r.columns.iter().map(|c| (c.name.as_str(), c.key, c.type_oid)).collect();
        assert_eq!(
            names,
            [("id", true, oid::INT8), ("total", false, oid::NUMERIC), ("doc", false, oid::JSONB), ("note", false, 25)]
        );
        assert_eq!(r.columns[1].type_modifier, 655_366);
        let catalog = Relation { namespace: String::new(), ..r };
        assert_eq!(catalog.qualified_name(), "orders");
    }

    #[test]
    fn insert_to_json_by_column_type() {
        let insert = Bytes::tag(b'I')
            .u32(16_390)
            .u8(b'N')
            .i16(4)
            .text("7")
            .text("12.50")
            .text(r#"{"a": [1, 2]}"#)
            .u8(b'n')
            .done();
        let Ok(Message::Insert { relation: 16_390, new }) = decode(&insert) else { panic!() };
        let row = relation().row(&new).unwrap();
        assert_eq!(Value::Object(row.values), json!({"id": 7, "total": 12.5, "doc": {"a": [1, 2]}, "note": null}));
        assert!(row.unchanged.is_empty());
    }

    #[test]
    fn update_with_key_with_full_old_row_and_without_old() {
        let key = Bytes::tag(b'U')
            .u32(16_390)
            .u8(b'K')
            .i16(4)
            .text("7")
            .u8(b'n')
            .u8(b'n')
            .u8(b'n')
            .u8(b'N')
            .i16(4)
            .text("8")
            .text("1")
            .u8(b'u')
            .text("hi")
            .done();
        let Ok(Message::Update { relation: 16_390, old: Some(OldRow::Key(old)), new }) = decode(&key) else { panic!() };
        let r = relation();
        // Only the key's columns, not the nulls sent for the others.
        assert_eq!(Value::Object(r.key(&old).unwrap().values), json!({"id": 7}));
        let row = r.row(&new).unwrap();
        assert_eq!(Value::Object(row.values), json!({"id": 8, "total": 1, "note": "hi"}));
        assert_eq!(row.unchanged, ["doc"]);

        let full = Bytes::tag(b'U').u32(16_390).u8(b'O').i16(1).text("1").u8(b'N').i16(1).text("2").done();
        let decoded = decode(&full).unwrap();
        assert!(
            matches!(decoded, Message::Update { old: Some(OldRow::Full(ref o)), .. } if o == &vec![Datum::Text(b"1".to_vec())])
        );

        let plain = Bytes::tag(b'U').u32(16_390).u8(b'N').i16(1).u8(b'n').done();
        assert_eq!(decode(&plain), Ok(Message::Update { relation: 16_390, old: None, new: vec![Datum::Null] }));
    }

    #[test]
    fn delete_with_key_or_full_row() {
        let key = Bytes::tag(b'D').u32(16_390).u8(b'K').i16(1).text("7").done();
        assert_eq!(
            decode(&key),
            Ok(Message::Delete { relation: 16_390, old: OldRow::Key(vec![Datum::Text(b"7".to_vec())]) })
        );
        let full = Bytes::tag(b'D').u32(16_390).u8(b'O').i16(2).text("7").u8(b'n').done();
        assert_eq!(
            decode(&full),
            Ok(Message::Delete { relation: 16_390, old: OldRow::Full(vec![Datum::Text(b"7".to_vec()), Datum::Null]) })
        );
        let bad = Bytes::tag(b'D').u32(16_390).u8(b'N').i16(0).done();
        assert!(matches!(decode(&bad), Err(DecodeError::Unexpected { found: 'N', at: 5, .. })));
    }

    #[test]
    fn truncate_with_options() {
        let t = Bytes::tag(b'T').i32(2).u8(3).u32(16_390).u32(16_391).done();
        assert_eq!(
            decode(&t),
            Ok(Message::Truncate { cascade: true, restart_identity: true, relations: vec![16_390, 16_391] })
        );
        let plain = Bytes::tag(b'T').i32(1).u8(0).u32(5).done();
        assert_eq!(
            decode(&plain),
            Ok(Message::Truncate { cascade: false, restart_identity: false, relations: vec![5] })
        );
        // A count the bytes cannot hold is refused, without allocating for it.
        let lying = Bytes::tag(b'T').i32(i32::MAX).u8(0).u32(5).done();
        assert!(matches!(decode(&lying), Err(DecodeError::Truncated { what: "Truncate", .. })));
    }

    #[test]
    fn logical_decoding_message() {
        let m = Bytes::tag(b'M').u8(1).u64(99).str("app").i32(3).done();
        let mut m = m;
        m.extend(b"abc");
        assert_eq!(
            decode(&m),
            Ok(Message::Logical { transactional: true, lsn: 99, prefix: "app".into(), content: b"abc".to_vec() })
        );
    }

    #[test]
    fn malformed_messages_are_refused_not_half_read() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownType('Z')));
        let short = Bytes::tag(b'B').u64(1).done();
        assert!(matches!(decode(&short), Err(DecodeError::Truncated { what: "Begin", .. })));
        let long = Bytes::tag(b'B').u64(1).u64(2).u32(3).u8(0).done();
        assert_eq!(decode(&long), Err(DecodeError::Trailing { what: "Begin", extra: 1 }));
        let unterminated = Bytes::tag(b'O').u64(1).done().into_iter().chain(*b"name").collect::<Vec<_>>();
        assert_eq!(decode(&unterminated), Err(DecodeError::Unterminated { what: "Origin" }));
        let negative = Bytes::tag(b'I').u32(1).u8(b'N').i16(-1).done();
        assert!(matches!(decode(&negative), Err(DecodeError::Negative { value: -1, .. })));
        let bad_kind = Bytes::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x').done();
        assert!(matches!(decode(&bad_kind), Err(DecodeError::Unexpected { found: 'x', .. })));
        let no_new = Bytes::tag(b'I').u32(1).u8(b'K').done();
        assert!(matches!(decode(&no_new), Err(DecodeError::Unexpected { found: 'K', .. })));
        let long_text = Bytes::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(10).done();
        assert!(matches!(decode(&long_text), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn binary_columns_are_kept_as_bytea_text() {
        let insert = Bytes::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'b').i32(2).u8(0xde).u8(0xad).done();
        let Ok(Message::Insert { new, .. }) = decode(&insert) else { panic!() };
        let r = Relation {
            oid: 1,
            namespace: "public".into(),
            name: "b".into(),
            replica_identity: b'd',
            columns: vec![Column { key: true, name: "x".into(), type_oid: 17, type_modifier: -1 }],
        };
        assert_eq!(Value::Object(r.row(&new).unwrap().values), json!({"x": "\\xdead"}));
    }

    #[test]
    fn rows_need_their_relation_and_its_column_count() {
        let mut relations = Relations::default();
        assert_eq!(relations.get(16_390).err(), Some(RowError::UnknownRelation(16_390)));
        relations.remember(relation());
        let r = relations.get(16_390).unwrap();
        assert!(matches!(r.row(&vec![Datum::Null]), Err(RowError::ColumnCount { expected: 4, found: 1, .. })));
    }

    #[test]
    fn column_values_by_type() {
        assert_eq!(column_value(oid::BOOL, "t"), json!(true));
        assert_eq!(column_value(oid::BOOL, "f"), json!(false));
        assert_eq!(column_value(oid::INT2, "-3"), json!(-3));
        assert_eq!(column_value(oid::INT8, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(column_value(oid::OID, "4294967295"), json!(4_294_967_295_u32));
        assert_eq!(column_value(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(column_value(oid::FLOAT4, "NaN"), json!("NaN"));
        assert_eq!(column_value(oid::FLOAT8, "-Infinity"), json!("-Infinity"));
        assert_eq!(column_value(oid::JSON, r#"{"b": 1, "a": 2}"#).to_string(), r#"{"b":1,"a":2}"#);
        assert_eq!(column_value(oid::JSONB, "not json"), json!("not json"));
        assert_eq!(column_value(25, "plain text"), json!("plain text"));
        assert_eq!(column_value(1114, "2024-05-01 12:00:00"), json!("2024-05-01 12:00:00"));
        assert_eq!(column_value(1007, "{1,2,3}"), json!("{1,2,3}"));
    }

    #[test]
    fn numerics_are_numbers_only_when_lossless() {
        assert_eq!(column_value(oid::NUMERIC, "42"), json!(42));
        assert_eq!(column_value(oid::NUMERIC, "-12.50"), json!(-12.5));
        assert_eq!(column_value(oid::NUMERIC, "0.1"), json!(0.1));
        assert_eq!(column_value(oid::NUMERIC, "0.000"), json!(0));
        assert_eq!(column_value(oid::NUMERIC, "-5.00"), json!(-5));
        assert_eq!(column_value(oid::NUMERIC, "123456789012.345"), json!(123_456_789_012.345));
        assert_eq!(column_value(oid::NUMERIC, "1000000000000000000000"), json!(1e21));
        // Too many digits for an f64, or no number at all: the text.
        for text in
            ["12345678901234567890", "0.1234567890123456", "3.14159265358979323846", "NaN", "Infinity", "-Infinity"]
        {
            assert_eq!(column_value(oid::NUMERIC, text), json!(text), "{text}");
        }
        let tiny = format!("0.{}1", "0".repeat(400));
        assert_eq!(column_value(oid::NUMERIC, &tiny), json!(tiny));
        // What is written is the same decimal as the server's text.
        for text in ["19.99", "-0.07", "99999999999999.9", "1.00000000000001"] {
            let written = column_value(oid::NUMERIC, text).to_string();
            assert_eq!(written.parse::<f64>().unwrap(), text.parse::<f64>().unwrap(), "{text}");
            assert!(written.len() <= text.len(), "{text} → {written}");
        }
    }
}
