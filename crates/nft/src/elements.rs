//! Set and map elements over raw nf_tables netlink: no `nft` process, no
//! text, so a full load of 100k elements is one `sendmsg` that the kernel
//! applies as one transaction.
//!
//! Encoding ([`encode_batch`]) is pure and separate from I/O ([`apply`]).
//! The wire format follows the kernel uapi headers
//! `include/uapi/linux/netlink.h`, `netfilter/nfnetlink.h` and
//! `netfilter/nf_tables.h`, and matches byte for byte what `nft 1.0.6`
//! sends for `add element` (`nft --debug=mnl`), except that nft also adds
//! an `NFTA_SET_ELEM_LIST_SET_ID`, which only matters for sets created in
//! the same batch.
//!
//! A batch is `BATCH_BEGIN`, one message per run of consecutive ops of the
//! same kind on the same set (split so that an attribute's 16-bit length
//! never overflows), and `BATCH_END`. The kernel processes a batch from one
//! skb, synchronously inside `sendmsg`, and commits it only if every message
//! succeeded: it all applies or none of it does.
//!
//! [`apply`] opens its socket in the calling thread's network namespace.

use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{getsockopt, recv, setsockopt, sockopt, MsgFlags, SetSockOpt};
use nix::sys::time::TimeVal;

use crate::NftError;

/// One field of a (possibly concatenated) key or value, as nftables stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// `ipv4_addr` / `ip daddr`: 4 bytes, network order.
    Ipv4(Ipv4Addr),
    /// `inet_proto` / `meta l4proto`: 1 byte.
    Proto(u8),
    /// `inet_service` / `th dport`: 2 bytes, big-endian.
    Port(u16),
    /// The result of `numgen random mod N`: 4 bytes, HOST byte order (it is
    /// a register value, not a packet field).
    U32(u32),
}

/// What an element maps to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Data {
    /// A set element (no data).
    None,
    /// A map element's value, e.g. `ip daddr . th dport`.
    Value(Vec<Field>),
    /// A verdict map element `goto CHAIN`.
    Goto(String),
    /// A verdict map element `jump CHAIN` (it returns to the rule after).
    Jump(String),
}

/// One change to the elements of a set or map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Remove every element of the set (DELSETELEM with no element list).
    Flush { set: String },
    /// `add element` semantics: adding an identical existing element is not
    /// an error (no NLM_F_EXCL). Adding an existing key with different data
    /// is (EEXIST): delete it first, in the same batch.
    Add {
        set: String,
        key: Vec<Field>,
        data: Data,
    },
    /// `delete element`: the element must exist (ENOENT otherwise).
    Delete { set: String, key: Vec<Field> },
}

/// Ops by index, made on demand: a full sync's 100k elements need never
/// all exist as `Op`s at once (only the encoded batch does).
pub trait OpList {
    fn len(&self) -> usize;
    fn op(&self, i: usize) -> std::borrow::Cow<'_, Op>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ops that exist already.
struct Slice<'a>(&'a [Op]);

impl OpList for Slice<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn op(&self, i: usize) -> std::borrow::Cow<'_, Op> {
        std::borrow::Cow::Borrowed(&self.0[i])
    }
}

impl Op {
    fn set(&self) -> &str {
        match self {
            Op::Flush { set } | Op::Add { set, .. } | Op::Delete { set, .. } => set,
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Op::Flush { .. } => "flush",
            Op::Add { .. } => "add to",
            Op::Delete { .. } => "delete from",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Ipv4(a) => write!(f, "{a}"),
            Field::Proto(6) => f.write_str("tcp"),
            Field::Proto(17) => f.write_str("udp"),
            Field::Proto(132) => f.write_str("sctp"),
            Field::Proto(p) => write!(f, "{p}"),
            Field::Port(p) => write!(f, "{p}"),
            Field::U32(n) => write!(f, "{n}"),
        }
    }
}

/// `a . b . c`, as nft writes a concatenation.
struct Concat<'a>(&'a [Field]);

impl fmt::Display for Concat<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, x) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// uapi constants

/// `sizeof(struct nlmsghdr)`: len u32, type u16, flags u16, seq u32, pid u32
/// (host byte order).
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct nfgenmsg)`: family u8, version u8, res_id be16.
const NFGENMSG_LEN: usize = 4;
/// `sizeof(struct nlattr)`: len u16, type u16 (host byte order); the length
/// counts the header and the payload but not the padding to 4 bytes.
const NLA_HDRLEN: usize = 4;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
/// In an NLMSG_ERROR: the original payload was left out (NETLINK_CAP_ACK).
const NLM_F_CAPPED: u16 = 0x100;
/// In an NLMSG_ERROR: extended-ack TLVs follow (NETLINK_EXT_ACK).
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// nfnetlink.h: `NFNL_MSG_BATCH_BEGIN = NLMSG_MIN_TYPE`, `BATCH_END` next.
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// linux/netfilter.h: the `ip` family.
const NFPROTO_IPV4: u8 = 2;
const NFNETLINK_V0: u8 = 0;

// enum nf_tables_msg_types
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
// enum nft_verdict_attributes
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// enum nft_verdicts: NFT_CONTINUE -1, NFT_BREAK -2, NFT_JUMP -3, NFT_GOTO -4.
const NFT_GOTO: i32 = -4;
const NFT_JUMP: i32 = -3;

/// An attribute's length is a u16, so one `NFTA_SET_ELEM_LIST_ELEMENTS`
/// nest (header included) holds at most this many bytes; more elements go
/// in another message of the same batch. Everything is 4-aligned, so the
/// largest nest actually written is 65532 bytes.
pub const MAX_ELEMENTS_NEST: usize = u16::MAX as usize;

// ---------------------------------------------------------------------------
// Encoding

/// Append `f`'s bytes as the kernel compares them.
fn put_field(out: &mut Vec<u8>, f: &Field) {
    match f {
        Field::Ipv4(a) => out.extend_from_slice(&a.octets()),
        Field::Proto(p) => out.push(*p),
        Field::Port(p) => out.extend_from_slice(&p.to_be_bytes()),
        Field::U32(n) => out.extend_from_slice(&n.to_ne_bytes()),
    }
}

/// A key or value: a single field is stored at its own length (a lone
/// `inet_service` key is 2 bytes); in a concatenation every field starts on
/// a 32-bit register boundary, so each one, the last included, is padded
/// with zeros to a multiple of 4 (`ipv4_addr . inet_proto . inet_service` is
/// 4 + 4 + 4 = 12 bytes).
fn put_fields(out: &mut Vec<u8>, fields: &[Field]) {
    let concat = fields.len() > 1;
    for f in fields {
        let start = out.len();
        put_field(out, f);
        if concat {
            pad4(out, start);
        }
    }
}

/// Zero-pad what was written since `start` to a multiple of 4 bytes.
fn pad4(out: &mut Vec<u8>, start: usize) {
    while !(out.len() - start).is_multiple_of(4) {
        out.push(0);
    }
}

/// Append attribute `ty` with `payload`, padded to 4 bytes.
fn put_attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let start = out.len();
    let len = u16::try_from(NLA_HDRLEN + payload.len()).expect("attribute under 64 KiB");
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    pad4(out, start);
}

/// A NUL-terminated string attribute (the kernel's NLA_STRING/NLA_NUL_STRING).
fn put_str(out: &mut Vec<u8>, ty: u16, s: &str) {
    let mut p = Vec::with_capacity(s.len() + 1);
    p.extend_from_slice(s.as_bytes());
    p.push(0);
    put_attr(out, ty, &p);
}

/// Open a nested attribute; returns its offset for [`end_nest`].
fn begin_nest(out: &mut Vec<u8>, ty: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

/// Write the length of the nest opened at `at` (its contents are aligned).
fn end_nest(out: &mut [u8], at: usize) {
    let len = u16::try_from(out.len() - at).expect("nest under 64 KiB");
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Open a netlink message with an nfgenmsg header; returns its offset for
/// [`end_msg`]. `res_id` is big-endian on the wire.
fn begin_msg(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by end_msg
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0 is fine, the kernel fills it in
    out.push(family);
    out.push(NFNETLINK_V0);
    out.extend_from_slice(&res_id.to_be_bytes());
    at
}

fn end_msg(out: &mut [u8], at: usize) {
    let len = u32::try_from(out.len() - at).expect("message under 4 GiB");
    out[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

/// One element: `NFTA_LIST_ELEM { KEY { DATA_VALUE }, [DATA { DATA_VALUE |
/// DATA_VERDICT { CODE, CHAIN } }] }`.
fn put_elem(out: &mut Vec<u8>, key: &[Field], data: &Data) {
    let mut v = Vec::with_capacity(64);
    let elem = begin_nest(out, NFTA_LIST_ELEM);
    let k = begin_nest(out, NFTA_SET_ELEM_KEY);
    put_fields(&mut v, key);
    put_attr(out, NFTA_DATA_VALUE, &v);
    end_nest(out, k);
    match data {
        Data::None => {}
        Data::Value(fields) => {
            let d = begin_nest(out, NFTA_SET_ELEM_DATA);
            v.clear();
            put_fields(&mut v, fields);
            put_attr(out, NFTA_DATA_VALUE, &v);
            end_nest(out, d);
        }
        Data::Goto(chain) | Data::Jump(chain) => {
            let code = if matches!(data, Data::Goto(_)) {
                NFT_GOTO
            } else {
                NFT_JUMP
            };
            let d = begin_nest(out, NFTA_SET_ELEM_DATA);
            let verdict = begin_nest(out, NFTA_DATA_VERDICT);
            // The verdict code is a big-endian s32 (NLA_U32 read with ntohl).
            put_attr(out, NFTA_VERDICT_CODE, &code.to_be_bytes());
            put_str(out, NFTA_VERDICT_CHAIN, chain);
            end_nest(out, verdict);
            end_nest(out, d);
        }
    }
    end_nest(out, elem);
}

/// Where each element message of a batch is, for reading the kernel's answers.
struct Msg {
    seq: u32,
    /// Offset of its nlmsghdr in the batch.
    start: usize,
    /// Index in `ops` of its first op (its elements are consecutive ops).
    first_op: usize,
}

struct Encoded {
    bytes: Vec<u8>,
    begin_seq: u32,
    msgs: Vec<Msg>,
}

/// A message being filled with elements.
struct Open {
    delete: bool,
    set: String,
    msg: usize,
    nest: usize,
}

fn encode(table: &str, ops: &dyn OpList, first_seq: u32) -> Encoded {
    let mut out = Vec::with_capacity(64 + ops.len() * 48);
    let mut msgs = Vec::new();
    let mut seq = first_seq;
    let b = begin_msg(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0, // AF_UNSPEC
        NFNL_SUBSYS_NFTABLES,
    );
    end_msg(&mut out, b);

    let close = |out: &mut Vec<u8>, open: &mut Option<Open>| {
        if let Some(o) = open.take() {
            end_nest(out, o.nest);
            end_msg(out, o.msg);
        }
    };
    // Starts an element message; returns the offset of its nlmsghdr.
    let mut start =
        |out: &mut Vec<u8>, msgs: &mut Vec<Msg>, ty: u16, set: &str, first_op: usize| {
            seq = seq.wrapping_add(1);
            let mut flags = NLM_F_REQUEST | NLM_F_ACK;
            if ty == NFT_MSG_NEWSETELEM {
                flags |= NLM_F_CREATE;
            }
            // The subsystem goes in the high byte of the message type.
            let ty = (NFNL_SUBSYS_NFTABLES << 8) | ty;
            let at = begin_msg(out, ty, flags, seq, NFPROTO_IPV4, 0);
            put_str(out, NFTA_SET_ELEM_LIST_TABLE, table);
            put_str(out, NFTA_SET_ELEM_LIST_SET, set);
            msgs.push(Msg {
                seq,
                start: at,
                first_op,
            });
            at
        };

    let mut open: Option<Open> = None;
    let mut elem = Vec::with_capacity(128);
    for i in 0..ops.len() {
        let op = ops.op(i);
        let (delete, set, key, data) = match &*op {
            Op::Flush { set } => {
                close(&mut out, &mut open);
                let at = start(&mut out, &mut msgs, NFT_MSG_DELSETELEM, set, i);
                end_msg(&mut out, at);
                continue;
            }
            Op::Add { set, key, data } => (false, set.as_str(), key, data),
            Op::Delete { set, key } => (true, set.as_str(), key, &Data::None),
        };
        elem.clear();
        put_elem(&mut elem, key, data);
        if let Some(o) = &open {
            let nest_len = out.len() - o.nest;
            if o.delete != delete || o.set != set || nest_len + elem.len() > MAX_ELEMENTS_NEST {
                close(&mut out, &mut open);
            }
        }
        if open.is_none() {
            let ty = if delete {
                NFT_MSG_DELSETELEM
            } else {
                NFT_MSG_NEWSETELEM
            };
            let msg = start(&mut out, &mut msgs, ty, set, i);
            let nest = begin_nest(&mut out, NFTA_SET_ELEM_LIST_ELEMENTS);
            open = Some(Open {
                delete,
                set: set.to_string(),
                msg,
                nest,
            });
        }
        out.extend_from_slice(&elem);
    }
    close(&mut out, &mut open);

    let end_seq = seq.wrapping_add(1);
    let e = begin_msg(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        end_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    end_msg(&mut out, e);
    Encoded {
        bytes: out,
        begin_seq: first_seq,
        msgs,
    }
}

/// Encode one atomic batch (BATCH_BEGIN, messages, BATCH_END) for table
/// `table` of family ip (NFPROTO_IPV4). Sequence numbers run from
/// `first_seq` (BATCH_BEGIN) up by one per message. Consecutive adds (or
/// deletes) on one set share a message, split where the element list would
/// outgrow [`MAX_ELEMENTS_NEST`]; order is kept, so `Delete` then `Add` of
/// one key replaces it.
pub fn encode_batch(table: &str, ops: &[Op], first_seq: u32) -> Vec<u8> {
    encode(table, &Slice(ops), first_seq).bytes
}

// ---------------------------------------------------------------------------
// I/O

fn netlink_err(what: String) -> NftError {
    NftError::Rejected {
        stderr: format!("nf_tables netlink: {what}"),
    }
}

/// What an errno means for set elements.
fn meaning(e: Errno) -> &'static str {
    match e {
        Errno::ENOENT => "no such table, set, element or chain",
        Errno::EEXIST => {
            "the element exists with different data (delete it first, in the same batch)"
        }
        Errno::EBUSY => "busy (the set or element is in use)",
        Errno::ENFILE | Errno::E2BIG | Errno::ENOSPC => "set full (its size limit is reached)",
        Errno::EINVAL => {
            "invalid (key or data does not match the set's type: field lengths, set or map)"
        }
        // Found when the kernel validates the table's chain graph (6.x: EMLINK).
        Errno::ELOOP | Errno::EMLINK => {
            "a verdict makes a chain loop, or chains nest deeper than the kernel's jump stack"
        }
        Errno::EOPNOTSUPP => "not supported by this set",
        Errno::EPERM => "not permitted (needs CAP_NET_ADMIN)",
        Errno::ENOMEM => "out of memory",
        Errno::ENAMETOOLONG => "name too long",
        _ => e.desc(),
    }
}

/// One NLMSG_ERROR answer.
struct Ack {
    seq: u32,
    /// 0 for success, else a positive errno.
    errno: i32,
    /// NLMSGERR_ATTR_OFFS: offset of the bad attribute in the original message.
    bad_offset: Option<usize>,
    /// NLMSGERR_ATTR_MSG.
    text: Option<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Attributes in `b`: (type without flags, offset of the header, payload).
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, usize, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, at)?);
        let ty = u16_at(b, at + 2)? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || at + len > b.len() {
            return None;
        }
        let item = (ty, at, &b[at + NLA_HDRLEN..at + len]);
        at += (len + 3) & !3;
        Some(item)
    })
}

/// Parse the netlink messages of one datagram; keeps NLMSG_ERRORs addressed
/// to `portid`.
fn parse_acks(b: &[u8], portid: u32, acks: &mut Vec<Ack>) {
    let mut at = 0;
    while let (Some(len), Some(ty)) = (u32_at(b, at), u16_at(b, at + 4)) {
        let len = len as usize;
        if len < NLMSG_HDRLEN {
            break;
        }
        let flags = u16_at(b, at + 6).unwrap_or(0);
        let pid = u32_at(b, at + 12).unwrap_or(0);
        // A truncated datagram still has the error code and the original header.
        let end = (at + len).min(b.len());
        let m = &b[at..end];
        if ty == NLMSG_ERROR && pid == portid {
            let errno = u32_at(m, NLMSG_HDRLEN).map(|e| -(e as i32));
            let orig_seq = u32_at(m, NLMSG_HDRLEN + 4 + 8);
            if let (Some(errno), Some(seq)) = (errno, orig_seq) {
                let mut ack = Ack {
                    seq,
                    errno,
                    bad_offset: None,
                    text: None,
                };
                if flags & NLM_F_ACK_TLVS != 0 {
                    let orig_len = if flags & NLM_F_CAPPED != 0 {
                        NLMSG_HDRLEN
                    } else {
                        (u32_at(m, NLMSG_HDRLEN + 4).unwrap_or(0) as usize + 3) & !3
                    };
                    let tlvs = NLMSG_HDRLEN + 4 + orig_len;
                    for (ty, _, p) in attrs(m.get(tlvs..).unwrap_or(&[])) {
                        match ty {
                            NLMSGERR_ATTR_MSG => {
                                let s = p.split(|c| *c == 0).next().unwrap_or(&[]);
                                ack.text = Some(String::from_utf8_lossy(s).into_owned());
                            }
                            NLMSGERR_ATTR_OFFS => {
                                ack.bad_offset = u32_at(p, 0).map(|o| o as usize);
                            }
                            _ => {}
                        }
                    }
                }
                acks.push(ack);
            }
        }
        at += (len + 3) & !3;
    }
}

/// Say which part of message `m` the kernel's bad-attribute offset points
/// at: the table, the set, or one element.
fn blame(enc: &Encoded, ops: &dyn OpList, m: usize, offset: usize) -> Option<String> {
    let msg = &enc.msgs[m];
    let end = enc.msgs.get(m + 1).map_or(enc.bytes.len(), |n| n.start);
    let body_at = NLMSG_HDRLEN + NFGENMSG_LEN;
    let body = enc.bytes.get(msg.start + body_at..end)?;
    let offset = offset.checked_sub(body_at)?;
    for (ty, at, payload) in attrs(body) {
        if offset < at || offset >= at + NLA_HDRLEN + payload.len() {
            continue;
        }
        return match ty {
            NFTA_SET_ELEM_LIST_TABLE => Some("the table".into()),
            NFTA_SET_ELEM_LIST_SET => Some("the set".into()),
            NFTA_SET_ELEM_LIST_ELEMENTS => {
                let inner = offset.checked_sub(at + NLA_HDRLEN)?;
                let i = attrs(payload)
                    .position(|(_, a, p)| inner >= a && inner < a + NLA_HDRLEN + p.len())?;
                let n = msg.first_op + i;
                if n >= ops.len() {
                    return None;
                }
                match &*ops.op(n) {
                    Op::Add { key, data, .. } => Some(match data {
                        Data::None => format!("element {{ {} }}", Concat(key)),
                        Data::Value(v) => format!("element {{ {} : {} }}", Concat(key), Concat(v)),
                        Data::Goto(c) => format!("element {{ {} : goto {c} }}", Concat(key)),
                        Data::Jump(c) => format!("element {{ {} : jump {c} }}", Concat(key)),
                    }),
                    Op::Delete { key, .. } => Some(format!("element {{ {} }}", Concat(key))),
                    Op::Flush { .. } => None,
                }
            }
            _ => None,
        };
    }
    None
}

/// Describe a failed ack for the user: the op, the set, what the errno means.
fn describe(enc: &Encoded, table: &str, ops: &dyn OpList, ack: &Ack) -> String {
    let e = Errno::from_raw(ack.errno);
    let mut s = match enc.msgs.iter().position(|m| m.seq == ack.seq) {
        Some(m) => {
            let op = ops.op(enc.msgs[m].first_op);
            let mut s = format!(
                "{} set {} in table ip {table}: {} ({e:?})",
                op.verb(),
                op.set(),
                meaning(e)
            );
            if let Some(what) = ack.bad_offset.and_then(|o| blame(enc, ops, m, o)) {
                s.push_str(&format!(", at {what}"));
            }
            s
        }
        // The batch itself: permission, or the commit (e.g. chain validation).
        None if ack.seq == enc.begin_seq => {
            format!(
                "the batch for table ip {table} failed: {} ({e:?})",
                meaning(e)
            )
        }
        None => format!("message seq {}: {} ({e:?})", ack.seq, meaning(e)),
    };
    if let Some(t) = &ack.text {
        s.push_str(&format!(" [{t}]"));
    }
    s
}

/// Let the socket buffer take `want` bytes: SO_*BUFFORCE (root) goes past
/// the `net.core.[wr]mem_max` limit, else the plain option up to it. `have`
/// is the current size as set (the kernel reports it doubled).
fn raise_buffer<F, P>(sock: &netlink_sys::Socket, want: usize, have: usize, force: F, plain: P)
where
    F: SetSockOpt<Val = usize>,
    P: SetSockOpt<Val = usize>,
{
    if have < want && setsockopt(sock, force, &want).is_err() {
        let _ = setsockopt(sock, plain, &want);
    }
}

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Send `ops` to table `ip TABLE` as ONE atomic transaction: all of it
/// applies or none does. The socket is opened in the calling thread's
/// network namespace. Errors name the op, the set, the errno's meaning and,
/// where the kernel says (extended ack), the offending element.
pub fn apply(table: &str, ops: &[Op]) -> Result<(), NftError> {
    apply_list(table, &Slice(ops))
}

/// [`apply`] for ops made on demand.
pub fn apply_list(table: &str, ops: &dyn OpList) -> Result<(), NftError> {
    if ops.is_empty() {
        return Ok(());
    }
    // Room for the sequence numbers of a whole batch.
    let first_seq = SEQ.fetch_add(ops.len() as u32 + 2, Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    let enc = encode(table, ops, first_seq);
    let encoded = t0.elapsed();

    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)
        .map_err(|e| netlink_err(format!("cannot open a NETLINK_NETFILTER socket: {e}")))?;
    let portid = sock
        .bind_auto()
        .map_err(|e| netlink_err(format!("cannot bind the netlink socket: {e}")))?
        .port_number();
    // Error acks carry only the original header, not a copy of a 64 KiB
    // message; and say which attribute was bad. Both are optional.
    let _ = sock.set_cap_ack(true);
    let _ = sock.set_ext_ack(true);

    // The kernel refuses a message larger than the send buffer (EMSGSIZE),
    // and the whole batch must be one message: size the buffer to it, as
    // nft does.
    let len = enc.bytes.len();
    let have = getsockopt(&sock, sockopt::SndBuf).unwrap_or(0) / 2;
    raise_buffer(
        &sock,
        len + 4096,
        have,
        sockopt::SndBufForce,
        sockopt::SndBuf,
    );
    // One ack per message must fit too, or the kernel drops some (ENOBUFS).
    // An ack skb costs about 1 KiB of receive buffer.
    let acks_room = (enc.msgs.len() + 16) * 2048;
    let have = getsockopt(&sock, sockopt::RcvBuf).unwrap_or(0) / 2;
    raise_buffer(
        &sock,
        acks_room,
        have,
        sockopt::RcvBufForce,
        sockopt::RcvBuf,
    );

    loop {
        match sock.send(&enc.bytes, 0) {
            Ok(n) if n == len => break,
            Ok(n) => return Err(netlink_err(format!("short send: {n} of {len} bytes"))),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let hint = if e.raw_os_error() == Some(Errno::EMSGSIZE as i32) {
                    " (the batch is larger than the socket send buffer: SO_SNDBUFFORCE needs CAP_NET_ADMIN, or raise net.core.wmem_max)"
                } else {
                    ""
                };
                return Err(netlink_err(format!(
                    "sending a {len}-byte batch for table ip {table} failed: {e}{hint}"
                )));
            }
        }
    }

    let sent = t0.elapsed();
    // nfnetlink runs the whole batch, commit or abort included, inside
    // sendmsg, so every answer is already queued (nft reads them with a
    // zero-timeout select). Block, briefly, only while answers are missing
    // and none failed; then drain what is left without blocking.
    let _ = setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::new(1, 0));
    let mut acks = Vec::new();
    let mut answered = vec![false; enc.msgs.len()];
    let mut n_answered = 0;
    let mut failed = false;
    let mut buf = vec![0u8; 256 * 1024];
    let fd = sock.as_raw_fd();
    loop {
        let mut flags = MsgFlags::MSG_TRUNC;
        if failed || n_answered == answered.len() {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        match recv(fd, &mut buf, flags) {
            Ok(n) => {
                let from = acks.len();
                parse_acks(&buf[..n.min(buf.len())], portid, &mut acks);
                for a in &acks[from..] {
                    failed |= a.errno != 0;
                    // Element messages have the seqs after BATCH_BEGIN's.
                    let i = a.seq.wrapping_sub(first_seq).wrapping_sub(1) as usize;
                    if let Some(seen) = answered.get_mut(i) {
                        if !*seen {
                            *seen = true;
                            n_answered += 1;
                        }
                    }
                }
            }
            Err(Errno::EINTR) => continue,
            // Nothing more queued, or the timeout.
            Err(Errno::EAGAIN) => break,
            Err(e) => {
                return Err(NftError::Unknown(format!(
                    "reading the kernel's answers for table ip {table} failed: {e}"
                )))
            }
        }
    }

    tracing::debug!(
        encode_ms = encoded.as_secs_f64() * 1000.0,
        kernel_ms = (sent - encoded).as_secs_f64() * 1000.0,
        acks_ms = (t0.elapsed() - sent).as_secs_f64() * 1000.0,
        bytes = len,
        messages = enc.msgs.len(),
        "element batch"
    );
    // Errors come in message order after a failed batch; the first is the cause.
    if let Some(bad) = acks
        .iter()
        .filter(|a| a.errno != 0)
        .min_by_key(|a| a.seq.wrapping_sub(first_seq))
    {
        let others = acks.iter().filter(|a| a.errno != 0).count() - 1;
        let mut s = describe(&enc, table, ops, bad);
        if others > 0 {
            s.push_str(&format!(" (and {others} more error(s))"));
        }
        return Err(netlink_err(s));
    }
    if n_answered != answered.len() {
        // The kernel drops a batch it cannot parse without a word.
        return Err(netlink_err(format!(
            "the kernel answered {n_answered} of {} messages for table ip {table}: the batch was dropped",
            answered.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Field {
        Field::Ipv4(s.parse().unwrap())
    }

    /// Parsed view of a batch, for checking structure.
    #[derive(Debug)]
    struct M {
        ty: u16,
        flags: u16,
        seq: u32,
        nfgen: [u8; 4],
        body: Vec<u8>,
    }

    fn messages(b: &[u8]) -> Vec<M> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let len = u32_at(b, at).unwrap() as usize;
            assert!(
                len >= 20 && at + len <= b.len(),
                "bad nlmsg_len {len} at {at}"
            );
            assert_eq!(len % 4, 0);
            out.push(M {
                ty: u16_at(b, at + 4).unwrap(),
                flags: u16_at(b, at + 6).unwrap(),
                seq: u32_at(b, at + 8).unwrap(),
                nfgen: b[at + 16..at + 20].try_into().unwrap(),
                body: b[at + 20..at + len].to_vec(),
            });
            at += len;
        }
        out
    }

    /// `nlattr` header bytes in host order.
    fn h(len: u16, ty: u16) -> Vec<u8> {
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v
    }

    #[test]
    fn key_layout_single_and_concatenated() {
        let mut v = Vec::new();
        put_fields(&mut v, &[Field::Port(80)]);
        assert_eq!(v, [0x00, 0x50], "a lone inet_service key is 2 bytes");
        v.clear();
        put_fields(&mut v, &[Field::Proto(6)]);
        assert_eq!(v, [6]);
        v.clear();
        put_fields(&mut v, &[ip("10.0.0.1"), Field::Proto(6), Field::Port(80)]);
        assert_eq!(v, [10, 0, 0, 1, 6, 0, 0, 0, 0, 0x50, 0, 0]);
        v.clear();
        put_fields(&mut v, &[ip("10.0.0.1"), Field::Port(80), Field::U32(1)]);
        let mut want = vec![10, 0, 0, 1, 0, 0x50, 0, 0];
        want.extend_from_slice(&1u32.to_ne_bytes());
        assert_eq!(v, want);
        v.clear();
        put_fields(&mut v, &[Field::Proto(17), Field::Port(53)]);
        assert_eq!(v, [17, 0, 0, 0, 0, 53, 0, 0]);
    }

    /// The exact bytes of `add element ip t np-tcp-3 { 80 }`, as `nft
    /// --debug=mnl` shows nft 1.0.6 sending them (less its SET_ID attribute).
    #[test]
    fn exact_bytes_of_a_small_batch() {
        let ops = [Op::Add {
            set: "np-tcp-3".into(),
            key: vec![Field::Port(80)],
            data: Data::None,
        }];
        let b = encode_batch("t", &ops, 7);
        let mut want = Vec::new();
        // BATCH_BEGIN: len 20, type 0x10, NLM_F_REQUEST, seq 7, pid 0,
        // nfgenmsg { AF_UNSPEC, v0, res_id = htons(NFNL_SUBSYS_NFTABLES) }.
        want.extend_from_slice(&20u32.to_ne_bytes());
        want.extend_from_slice(&0x10u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 10]);
        // NEWSETELEM: type (10 << 8) | 12 = 2572, REQUEST|ACK|CREATE.
        let msg_len: u32 = 16 + 4 + 8 + 16 + 20;
        want.extend_from_slice(&msg_len.to_ne_bytes());
        want.extend_from_slice(&2572u16.to_ne_bytes());
        want.extend_from_slice(&0x405u16.to_ne_bytes());
        want.extend_from_slice(&8u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[2, 0, 0, 0]); // NFPROTO_IPV4, v0, res_id 0
        want.extend(h(6, 1)); // TABLE "t\0" + 2 pad
        want.extend_from_slice(b"t\0\0\0");
        want.extend(h(13, 2)); // SET "np-tcp-3\0" + 3 pad
        want.extend_from_slice(b"np-tcp-3\0\0\0\0");
        want.extend(h(20, 3 | 0x8000)); // ELEMENTS
        want.extend(h(16, 1 | 0x8000)); //   LIST_ELEM
        want.extend(h(12, 1 | 0x8000)); //     KEY
        want.extend(h(6, 1)); //                 DATA_VALUE: 2 bytes + 2 pad
        want.extend_from_slice(&[0x00, 0x50, 0, 0]);
        // BATCH_END.
        want.extend_from_slice(&20u32.to_ne_bytes());
        want.extend_from_slice(&0x11u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&9u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 10]);
        assert_eq!(b, want);
    }

    /// `lb { 10.0.0.1 . tcp . 80 : goto aff-x }`, as nft sends it.
    #[test]
    fn verdict_goto_encoding() {
        let mut out = Vec::new();
        put_elem(
            &mut out,
            &[ip("10.0.0.1"), Field::Proto(6), Field::Port(80)],
            &Data::Goto("aff-x".into()),
        );
        let mut want = h(52, 1 | 0x8000); // LIST_ELEM
        want.extend(h(20, 1 | 0x8000)); // KEY
        want.extend(h(16, 1)); //   DATA_VALUE, 12 bytes
        want.extend_from_slice(&[10, 0, 0, 1, 6, 0, 0, 0, 0, 0x50, 0, 0]);
        want.extend(h(28, 2 | 0x8000)); // DATA
        want.extend(h(24, 2 | 0x8000)); //   DATA_VERDICT
        want.extend(h(8, 1)); //               CODE: NFT_GOTO, be32
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xfc]);
        want.extend(h(10, 2)); //              CHAIN "aff-x\0" + 2 pad
        want.extend_from_slice(b"aff-x\0\0\0");
        assert_eq!(out, want);
    }

    #[test]
    fn map_value_encoding() {
        let mut out = Vec::new();
        put_elem(
            &mut out,
            &[ip("10.0.0.1"), Field::Port(80), Field::U32(1)],
            &Data::Value(vec![ip("10.1.0.1"), Field::Port(8080)]),
        );
        let mut want = h(40, 1 | 0x8000);
        want.extend(h(20, 1 | 0x8000));
        want.extend(h(16, 1));
        want.extend_from_slice(&[10, 0, 0, 1, 0, 0x50, 0, 0]);
        want.extend_from_slice(&1u32.to_ne_bytes());
        want.extend(h(16, 2 | 0x8000));
        want.extend(h(12, 1));
        want.extend_from_slice(&[10, 1, 0, 1, 0x1f, 0x90, 0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn flush_is_delsetelem_without_elements() {
        let b = encode_batch("t", &[Op::Flush { set: "s".into() }], 1);
        let m = messages(&b);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].ty, (10 << 8) | 14);
        assert_eq!(m[1].flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(m[1].nfgen, [2, 0, 0, 0]);
        let types: Vec<u16> = attrs(&m[1].body).map(|(t, _, _)| t).collect();
        assert_eq!(types, [NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET]);
    }

    #[test]
    fn large_element_lists_are_split_under_64k_in_order() {
        let n = 10_000u32;
        let key = |i: u32| {
            vec![
                Field::Ipv4(Ipv4Addr::from(0x0a00_0000 + i)),
                Field::Port(80),
                Field::U32(i % 3),
            ]
        };
        let mut ops: Vec<Op> = (0..n)
            .map(|i| Op::Add {
                set: "be-tcp".into(),
                key: key(i),
                data: Data::Value(vec![ip("10.1.0.1"), Field::Port(8080)]),
            })
            .collect();
        // A different kind, then the same set again: new messages, in order.
        ops.push(Op::Delete {
            set: "be-tcp".into(),
            key: key(0),
        });
        ops.push(Op::Add {
            set: "be-tcp".into(),
            key: key(0),
            data: Data::Value(vec![ip("10.1.0.2"), Field::Port(8080)]),
        });
        let b = encode_batch("t", &ops, 100);
        let m = messages(&b);
        assert_eq!(m.first().unwrap().ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(m.last().unwrap().ty, NFNL_MSG_BATCH_END);
        for (i, x) in m.iter().enumerate() {
            assert_eq!(x.seq, 100 + i as u32);
        }
        let mut seen = Vec::new();
        let mut kinds = Vec::new();
        for x in &m[1..m.len() - 1] {
            kinds.push(x.ty & 0xff);
            let (ty, _, list) = attrs(&x.body).nth(2).unwrap();
            assert_eq!(ty, NFTA_SET_ELEM_LIST_ELEMENTS);
            assert!(list.len() + NLA_HDRLEN <= MAX_ELEMENTS_NEST);
            for (ty, _, e) in attrs(list) {
                assert_eq!(ty, NFTA_LIST_ELEM);
                let (_, _, k) = attrs(e).next().unwrap();
                let (_, _, v) = attrs(k).next().unwrap();
                seen.push(u32::from_be_bytes(v[..4].try_into().unwrap()) - 0x0a00_0000);
            }
        }
        // 40 bytes per element: 1638 fit in a nest.
        let adds = n.div_ceil(((MAX_ELEMENTS_NEST - 4) / 40) as u32) as usize;
        assert_eq!(kinds.len(), adds + 2);
        assert!(kinds[..adds].iter().all(|k| *k == 12));
        assert_eq!(kinds[adds..], [14, 12]);
        let mut want: Vec<u32> = (0..n).collect();
        want.extend([0, 0]);
        assert_eq!(seen, want);
    }

    #[test]
    fn errors_point_at_the_element() {
        let ops = [
            Op::Flush { set: "a".into() },
            Op::Delete {
                set: "lb-all".into(),
                key: vec![ip("10.0.0.1"), Field::Proto(6), Field::Port(80)],
            },
            Op::Delete {
                set: "lb-all".into(),
                key: vec![ip("10.0.0.2"), Field::Proto(17), Field::Port(53)],
            },
        ];
        let enc = encode("t", &Slice(&ops), 1);
        // The second element of the second message: header, nfgenmsg, table
        // (8), set (12), elements nest header (4), first element (24).
        let off = 16 + 4 + 8 + 12 + 4 + 24 + 2;
        let ack = Ack {
            seq: 3,
            errno: 2,
            bad_offset: Some(off),
            text: None,
        };
        let s = describe(&enc, "t", &Slice(&ops), &ack);
        assert_eq!(
            s,
            "delete from set lb-all in table ip t: no such table, set, element or chain (ENOENT), at element { 10.0.0.2 . udp . 53 }"
        );
        let ack = Ack {
            seq: 3,
            errno: 2,
            bad_offset: Some(16 + 4 + 8 + 1),
            text: None,
        };
        assert!(describe(&enc, "t", &Slice(&ops), &ack).ends_with("at the set"));
    }

    #[test]
    fn parses_a_capped_extended_error_ack() {
        let mut b = Vec::new();
        let total: u32 = 16 + 4 + 16 + 8;
        b.extend_from_slice(&total.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&(NLM_F_CAPPED | NLM_F_ACK_TLVS).to_ne_bytes());
        b.extend_from_slice(&5u32.to_ne_bytes());
        b.extend_from_slice(&42u32.to_ne_bytes());
        b.extend_from_slice(&(-2i32).to_ne_bytes());
        // The original header: len, type, flags, seq 5, pid.
        b.extend_from_slice(&100u32.to_ne_bytes());
        b.extend_from_slice(&2572u16.to_ne_bytes());
        b.extend_from_slice(&5u16.to_ne_bytes());
        b.extend_from_slice(&5u32.to_ne_bytes());
        b.extend_from_slice(&42u32.to_ne_bytes());
        b.extend(h(8, NLMSGERR_ATTR_OFFS));
        b.extend_from_slice(&44u32.to_ne_bytes());
        let mut acks = Vec::new();
        parse_acks(&b, 42, &mut acks);
        assert_eq!(acks.len(), 1);
        assert_eq!(
            (acks[0].seq, acks[0].errno, acks[0].bad_offset),
            (5, 2, Some(44))
        );
        // Not ours: ignored.
        let mut acks = Vec::new();
        parse_acks(&b, 43, &mut acks);
        assert!(acks.is_empty());
    }
}
