//! `elements::apply` against the kernel: every set and map shape tweed uses
//! must end up with exactly the elements that `nft add element` writes into
//! a twin (`-ref`) of it. Needs root and `nft`; everything happens in
//! network namespaces of the test's own (`tweed-nlt-PID-TAG`), deleted at
//! the end even on failure.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use tweed_nft::elements::{self, Data, Field, Op};

/// Why the kernel tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (creating a network namespace needs it)");
    }
    let ok = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok("nft", "--version") {
        return Some("`nft` is missing");
    }
    if !ok("ip", "-V") {
        return Some("`ip` (iproute2) is missing");
    }
    None
}

macro_rules! skip_unless_kernel {
    () => {
        if let Some(why) = skip_reason() {
            // Straight to stderr: libtest's capture only takes eprintln!.
            let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
            return;
        }
    };
}

/// A network namespace of the test's own, deleted on drop (panics included).
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("tweed-nlt-{}-{tag}", std::process::id());
        let o = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Netns { name }
    }

    /// `ip netns exec NS nft ARGS`, with `stdin` as the script if any.
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let o = child.wait_with_output().unwrap();
        if o.status.success() {
            Ok(String::from_utf8(o.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    fn script(&self, s: &str) {
        self.nft(&["-f", "-"], Some(s))
            .unwrap_or_else(|e| panic!("nft -f - failed: {e}\n{s}"));
    }

    /// Run `f` on a thread that has entered this namespace, so that the
    /// netlink socket `elements::apply` opens belongs to it.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                let ino = || std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
                let before = ino();
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                // Never touch the machine's own namespace.
                let now = ino();
                assert_eq!(now, ns.metadata().unwrap().ino(), "setns did not take");
                assert_ne!(now, before, "still in the test's own network namespace");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn apply(&self, ops: &[Op]) -> Result<(), String> {
        self.run(|| elements::apply("t", ops))
            .map_err(|e| e.to_string())
    }

    /// Every set and map of `ip t`: name -> its elements (JSON, sorted).
    fn listing(&self) -> BTreeMap<String, Vec<String>> {
        let out = self.nft(&["-j", "list", "table", "ip", "t"], None).unwrap();
        parse_listing(&out)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn parse_listing(json: &str) -> BTreeMap<String, Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut out = BTreeMap::new();
    for item in v["nftables"].as_array().unwrap() {
        for kind in ["set", "map"] {
            if let Some(s) = item.get(kind) {
                let mut elems: Vec<String> = s["elem"]
                    .as_array()
                    .map(|a| a.iter().map(|e| e.to_string()).collect())
                    .unwrap_or_default();
                elems.sort();
                out.insert(s["name"].as_str().unwrap().to_string(), elems);
            }
        }
    }
    out
}

/// The shapes tweed uses, each with a `-ref` twin for nft to fill.
fn table(be_size: Option<u32>) -> String {
    let size = be_size.map(|n| format!(" size {n};")).unwrap_or_default();
    let mut s = String::from("table ip t {\n  chain aff-x { }\n  chain aff-y { }\n");
    for sfx in ["", "-ref"] {
        s += &format!(
            "  set lb-all{sfx} {{ type ipv4_addr . inet_proto . inet_service; }}
  set lb-tcp-3{sfx} {{ type ipv4_addr . inet_service; }}
  set np-tcp-3{sfx} {{ type inet_service; }}
  set np-all{sfx} {{ type inet_proto . inet_service; }}
  map be-tcp{sfx} {{ typeof ip daddr . th dport . numgen random mod 2 : ip daddr . th dport;{size} }}
  map npbe-tcp{sfx} {{ typeof th dport . numgen random mod 2 : ip daddr . th dport; }}
  map hostports{sfx} {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
  map lb{sfx} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
"
        );
    }
    s + "}\n"
}

fn ip(s: &str) -> Field {
    Field::Ipv4(s.parse().unwrap())
}

fn text(fields: &[Field]) -> String {
    fields
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(" . ")
}

/// An element as `nft` text.
fn elem_text(key: &[Field], data: &Data) -> String {
    match data {
        Data::None => text(key),
        Data::Value(v) => format!("{} : {}", text(key), text(v)),
        Data::Goto(c) => format!("{} : goto {c}", text(key)),
        Data::Jump(c) => format!("{} : jump {c}", text(key)),
    }
}

/// The same ops as an nft script on the `-ref` twins.
fn nft_script(ops: &[Op]) -> String {
    let mut s = String::new();
    for op in ops {
        s += &match op {
            Op::Flush { set } => {
                let kind = if MAPS.contains(&set.as_str()) {
                    "map"
                } else {
                    "set"
                };
                format!("flush {kind} ip t {set}-ref\n")
            }
            Op::Add { set, key, data } => {
                format!(
                    "add element ip t {set}-ref {{ {} }}\n",
                    elem_text(key, data)
                )
            }
            Op::Delete { set, key } => {
                format!("delete element ip t {set}-ref {{ {} }}\n", text(key))
            }
        };
    }
    s
}

fn add(set: &str, key: Vec<Field>, data: Data) -> Op {
    Op::Add {
        set: set.into(),
        key,
        data,
    }
}

fn del(set: &str, key: Vec<Field>) -> Op {
    Op::Delete {
        set: set.into(),
        key,
    }
}

fn val(v: Vec<Field>) -> Data {
    Data::Value(v)
}

const TCP: Field = Field::Proto(6);
const UDP: Field = Field::Proto(17);
const SCTP: Field = Field::Proto(132);
const MAPS: [&str; 4] = ["be-tcp", "npbe-tcp", "hostports", "lb"];
const NAMES: [&str; 8] = [
    "lb-all",
    "lb-tcp-3",
    "np-tcp-3",
    "np-all",
    "be-tcp",
    "npbe-tcp",
    "hostports",
    "lb",
];

/// One or more elements of every shape, edge values included.
fn population() -> Vec<Op> {
    let p = Field::Port;
    let n = Field::U32;
    vec![
        add("lb-all", vec![ip("10.96.0.1"), TCP, p(80)], Data::None),
        add("lb-all", vec![ip("10.96.0.1"), UDP, p(53)], Data::None),
        add(
            "lb-all",
            vec![ip("255.255.255.255"), SCTP, p(65535)],
            Data::None,
        ),
        add(
            "lb-all",
            vec![ip("0.0.0.0"), Field::Proto(1), p(0)],
            Data::None,
        ),
        add("lb-tcp-3", vec![ip("10.96.0.1"), p(80)], Data::None),
        add("lb-tcp-3", vec![ip("10.96.0.2"), p(443)], Data::None),
        add("lb-tcp-3", vec![ip("192.168.255.1"), p(65535)], Data::None),
        add("np-tcp-3", vec![p(30080)], Data::None),
        add("np-tcp-3", vec![p(1)], Data::None),
        add("np-tcp-3", vec![p(65535)], Data::None),
        add("np-tcp-3", vec![p(256)], Data::None),
        add("np-all", vec![TCP, p(30080)], Data::None),
        add("np-all", vec![UDP, p(30053)], Data::None),
        add("np-all", vec![SCTP, p(1)], Data::None),
        add(
            "be-tcp",
            vec![ip("10.96.0.1"), p(80), n(0)],
            val(vec![ip("10.244.1.2"), p(8080)]),
        ),
        add(
            "be-tcp",
            vec![ip("10.96.0.1"), p(80), n(1)],
            val(vec![ip("10.244.1.3"), p(8080)]),
        ),
        add(
            "be-tcp",
            vec![ip("10.96.0.2"), p(443), n(0)],
            val(vec![ip("10.244.2.200"), p(65535)]),
        ),
        add(
            "be-tcp",
            vec![ip("10.96.0.3"), p(1), n(257)],
            val(vec![ip("10.244.2.1"), p(1)]),
        ),
        add(
            "npbe-tcp",
            vec![p(30080), n(0)],
            val(vec![ip("10.244.1.2"), p(8080)]),
        ),
        add(
            "npbe-tcp",
            vec![p(30080), n(1)],
            val(vec![ip("10.244.1.3"), p(8080)]),
        ),
        add(
            "hostports",
            vec![TCP, p(8080)],
            val(vec![ip("10.244.1.9"), p(80)]),
        ),
        add(
            "hostports",
            vec![UDP, p(53)],
            val(vec![ip("10.244.1.9"), p(5353)]),
        ),
        add(
            "lb",
            vec![ip("10.96.0.5"), TCP, p(80)],
            Data::Goto("aff-x".into()),
        ),
        add(
            "lb",
            vec![ip("10.96.0.6"), UDP, p(53)],
            Data::Goto("aff-y".into()),
        ),
    ]
}

/// Every original lists exactly the elements of its `-ref` twin.
fn assert_twins(ns: &Netns, expect_nonempty: &[&str]) {
    let l = ns.listing();
    for name in NAMES {
        let mine = &l[name];
        let theirs = &l[&format!("{name}-ref")];
        assert_eq!(
            mine, theirs,
            "{name}: elements::apply (left) vs nft add element (right)"
        );
        if expect_nonempty.contains(&name) {
            assert!(!mine.is_empty(), "{name} is empty");
        }
    }
}

#[test]
fn every_shape_matches_what_nft_writes() {
    skip_unless_kernel!();
    let ns = Netns::new("shapes");
    ns.script(&table(Some(65536)));
    let ops = population();
    ns.script(&nft_script(&ops));
    ns.apply(&ops).unwrap();
    assert_twins(&ns, &NAMES);

    // Adding identical elements again is not an error.
    ns.apply(&ops).unwrap();
    assert_twins(&ns, &NAMES);
    // An empty batch touches nothing.
    ns.apply(&[]).unwrap();

    // Delete, replace (delete then add of one key in one batch), and flush.
    let p = Field::Port;
    let ops = vec![
        del("lb-all", vec![ip("10.96.0.1"), UDP, p(53)]),
        del("np-tcp-3", vec![p(1)]),
        del("be-tcp", vec![ip("10.96.0.1"), p(80), Field::U32(1)]),
        del("be-tcp", vec![ip("10.96.0.2"), p(443), Field::U32(0)]),
        add(
            "be-tcp",
            vec![ip("10.96.0.2"), p(443), Field::U32(0)],
            val(vec![ip("10.244.9.9"), p(9090)]),
        ),
        del("lb", vec![ip("10.96.0.5"), TCP, p(80)]),
        add(
            "lb",
            vec![ip("10.96.0.5"), TCP, p(80)],
            Data::Goto("aff-y".into()),
        ),
        Op::Flush {
            set: "np-all".into(),
        },
        Op::Flush {
            set: "hostports".into(),
        },
        // Flush, then add in the same batch.
        Op::Flush {
            set: "npbe-tcp".into(),
        },
        add(
            "npbe-tcp",
            vec![p(30081), Field::U32(0)],
            val(vec![ip("10.244.3.3"), p(80)]),
        ),
    ];
    ns.script(&nft_script(&ops));
    ns.apply(&ops).unwrap();
    assert_twins(&ns, &["lb-all", "np-tcp-3", "be-tcp", "lb", "npbe-tcp"]);
    let l = ns.listing();
    assert!(l["np-all"].is_empty() && l["hostports"].is_empty());
    assert_eq!(l["npbe-tcp"].len(), 1);

    // Flush everything, verdict map included.
    let ops: Vec<Op> = NAMES
        .iter()
        .map(|n| Op::Flush { set: n.to_string() })
        .collect();
    ns.script(&nft_script(&ops));
    ns.apply(&ops).unwrap();
    assert_twins(&ns, &[]);
    assert!(ns.listing().values().all(|e| e.is_empty()));
}

#[test]
fn a_failing_batch_changes_nothing() {
    skip_unless_kernel!();
    let ns = Netns::new("atomic");
    ns.script(&table(Some(65536)));
    ns.apply(&population()).unwrap();
    let before = ns.listing();
    let p = Field::Port;
    let good = vec![
        add("lb-all", vec![ip("10.96.7.7"), TCP, p(80)], Data::None),
        del("lb-tcp-3", vec![ip("10.96.0.1"), p(80)]),
        Op::Flush {
            set: "np-all".into(),
        },
        add(
            "be-tcp",
            vec![ip("10.96.7.7"), p(80), Field::U32(0)],
            val(vec![ip("10.244.7.7"), p(80)]),
        ),
        Op::Flush { set: "lb".into() },
    ];

    // The last op names a missing set.
    let mut ops = good.clone();
    ops.push(add("no-such-set", vec![p(1)], Data::None));
    let e = ns.apply(&ops).unwrap_err();
    eprintln!("missing set: {e}");
    assert!(e.contains("no-such-set") && e.contains("ENOENT"), "{e}");
    assert_eq!(ns.listing(), before, "a failed batch changed something");

    // Deleting a missing element: the error names the set and the element.
    let mut ops = good.clone();
    ops.push(del("lb-all", vec![ip("10.96.9.9"), UDP, p(9)]));
    let e = ns.apply(&ops).unwrap_err();
    eprintln!("missing element: {e}");
    assert!(
        e.contains("set lb-all") && e.contains("ENOENT") && e.contains("10.96.9.9 . udp . 9"),
        "{e}"
    );
    assert_eq!(ns.listing(), before);

    // Adding an existing key with different data.
    let mut ops = good.clone();
    ops.push(add(
        "hostports",
        vec![TCP, p(8080)],
        val(vec![ip("10.244.1.10"), p(80)]),
    ));
    let e = ns.apply(&ops).unwrap_err();
    eprintln!("clash: {e}");
    assert!(e.contains("set hostports") && e.contains("EEXIST"), "{e}");
    assert_eq!(ns.listing(), before);

    // A key of the wrong shape (2 bytes for a 12-byte key).
    let mut ops = good.clone();
    ops.push(add("lb-all", vec![p(80)], Data::None));
    let e = ns.apply(&ops).unwrap_err();
    eprintln!("wrong shape: {e}");
    assert!(e.contains("set lb-all") && e.contains("EINVAL"), "{e}");
    assert_eq!(ns.listing(), before);

    // A goto to a missing chain.
    let mut ops = good.clone();
    ops.push(add(
        "lb",
        vec![ip("10.96.0.9"), TCP, p(80)],
        Data::Goto("aff-missing".into()),
    ));
    let e = ns.apply(&ops).unwrap_err();
    eprintln!("missing chain: {e}");
    assert!(e.contains("set lb ") && e.contains("ENOENT"), "{e}");
    assert_eq!(ns.listing(), before);

    // A missing table.
    let e = ns
        .run(|| elements::apply("no-such-table", &good))
        .unwrap_err()
        .to_string();
    eprintln!("missing table: {e}");
    assert!(e.contains("ENOENT") && e.contains("at the table"), "{e}");
    assert_eq!(ns.listing(), before);

    // A goto that makes a loop: base chain `pre` jumps to `loop`, which
    // looks up `lb`, whose new element would go back to `loop`.
    ns.script(
        "add chain ip t pre { type nat hook prerouting priority -100; }
add chain ip t loop
add rule ip t pre jump loop
add rule ip t loop ip daddr . meta l4proto . th dport vmap @lb
",
    );
    let before = ns.listing();
    let mut ops = good.clone();
    ops.push(add(
        "lb",
        vec![ip("10.96.0.9"), TCP, p(80)],
        Data::Goto("loop".into()),
    ));
    let e = ns.apply(&ops).unwrap_err();
    eprintln!("loop: {e}");
    assert!(
        e.contains("set lb ") && (e.contains("EMLINK") || e.contains("ELOOP")),
        "{e}"
    );
    assert_eq!(ns.listing(), before);

    // And the same ops without the bad one apply.
    ns.apply(&good).unwrap();
    assert_ne!(ns.listing(), before);
}

/// `n` distinct backends for `be-tcp`.
fn backends(n: u32) -> Vec<Op> {
    (0..n)
        .map(|i| {
            add(
                "be-tcp",
                vec![
                    Field::Ipv4(Ipv4Addr::from(0x0a60_0000 + i / 2)),
                    Field::Port(80),
                    Field::U32(i % 2),
                ],
                val(vec![
                    Field::Ipv4(Ipv4Addr::from(0x0af4_0000 + i)),
                    Field::Port(8080),
                ]),
            )
        })
        .collect()
}

fn count(ns: &Netns, map: &str) -> usize {
    let out = ns
        .nft(&["-j", "list", "map", "ip", "t", map], None)
        .unwrap();
    parse_listing(&out)[map].len()
}

#[test]
fn a_100k_element_batch() {
    skip_unless_kernel!();
    let ns = Netns::new("100k");
    let n = 100_000;
    let ops = backends(n);
    let t = Instant::now();
    let batch = elements::encode_batch("t", &ops, 1).len();
    eprintln!("encoding 100k elements: {:.3} s", t.elapsed().as_secs_f64());

    // Sized as tweed's full sync sizes it: twice the elements, a power of two.
    let size = (n * 2).next_power_of_two();
    ns.script(&table(Some(size)));
    let t = Instant::now();
    ns.apply(&ops).unwrap();
    let took = t.elapsed();
    eprintln!(
        "100k elements ({batch} bytes) into be-tcp (size {size}) in {:.3} s",
        took.as_secs_f64()
    );
    assert_eq!(count(&ns, "be-tcp"), n as usize);

    // Replacing all of them: flush and re-add, one batch.
    let mut again = vec![Op::Flush {
        set: "be-tcp".into(),
    }];
    again.extend(backends(n));
    let t = Instant::now();
    ns.apply(&again).unwrap();
    eprintln!(
        "flush + 100k re-added in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(count(&ns, "be-tcp"), n as usize);

    // Without a size the kernel grows its hash table as elements go in.
    ns.script("delete table ip t\n");
    ns.script(&table(None));
    let t = Instant::now();
    ns.apply(&ops).unwrap();
    eprintln!(
        "100k elements into be-tcp without a size in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(count(&ns, "be-tcp"), n as usize);
}

#[test]
fn outgrowing_a_sized_map_fails_as_set_full() {
    skip_unless_kernel!();
    let ns = Netns::new("full");
    ns.script(&table(Some(65536)));
    let e = ns.apply(&backends(65537)).unwrap_err();
    eprintln!("over size: {e}");
    assert!(
        e.contains("set be-tcp") && e.contains("set full") && e.contains("ENFILE"),
        "{e}"
    );
    assert_eq!(count(&ns, "be-tcp"), 0, "a failed batch left elements");
    ns.apply(&backends(65536)).unwrap();
    assert_eq!(count(&ns, "be-tcp"), 65536);
}
