//! Node-local IPAM: one file per reserved address (named by the address,
//! holding the container ID and interface), an exclusive `flock` on a lock
//! file around every change, so concurrent plugin processes never hand out
//! the same address.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

/// Which attachment holds an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("IPAM store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The addresses pods may get: every address of the subnet except the
/// network address (the node's VTEP holds it) and the broadcast address.
pub fn usable(subnet: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let net = u32::from(subnet.network());
    let bcast = u32::from(subnet.broadcast());
    ((net + 1)..bcast).map(Ipv4Addr::from)
}

/// Pick the next free address after `last` (round robin, like host-local,
/// so a just-released address is not handed out again at once).
pub fn choose(
    subnet: Ipv4Net,
    taken: &BTreeMap<Ipv4Addr, Owner>,
    last: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let all: Vec<Ipv4Addr> = usable(subnet).collect();
    let start = last
        .and_then(|l| all.iter().position(|a| *a == l))
        .map(|i| i + 1)
        .unwrap_or(0);
    (0..all.len())
        .map(|i| all[(start + i) % all.len()])
        .find(|a| !taken.contains_key(a))
}

/// The reservations of one network on one node.
pub struct Store {
    dir: PathBuf,
}

struct Locked {
    _lock: Flock<File>,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> IpamError {
        let path = path.to_path_buf();
        move |source| IpamError::Io { path, source }
    }

    fn lock(&self) -> Result<Locked, IpamError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let p = self.dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(self.io(&p))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| IpamError::Io {
            path: p,
            source: io::Error::from(e),
        })?;
        Ok(Locked { _lock: lock })
    }

    /// Every reservation. Call under the lock for a consistent view.
    fn read_all(&self) -> Result<BTreeMap<Ipv4Addr, Owner>, IpamError> {
        let mut out = BTreeMap::new();
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(IpamError::Io {
                    path: self.dir.clone(),
                    source: e,
                })
            }
        };
        for ent in rd {
            let ent = ent.map_err(self.io(&self.dir))?;
            let Some(ip) = ent
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let body = fs::read_to_string(ent.path()).map_err(self.io(&ent.path()))?;
            let mut lines = body.lines();
            let container_id = lines.next().unwrap_or_default().trim().to_string();
            let ifname = lines.next().unwrap_or_default().trim().to_string();
            out.insert(
                ip,
                Owner {
                    container_id,
                    ifname,
                },
            );
        }
        Ok(out)
    }

    /// The current reservations (taken under the lock).
    pub fn list(&self) -> Result<BTreeMap<Ipv4Addr, Owner>, IpamError> {
        let _l = self.lock()?;
        self.read_all()
    }

    /// Reserve an address for `owner` in `subnet`; the same owner asking
    /// again gets the same address.
    pub fn allocate(&self, subnet: Ipv4Net, owner: &Owner) -> Result<Ipv4Addr, IpamError> {
        let _l = self.lock()?;
        let taken = self.read_all()?;
        if let Some((ip, _)) = taken
            .iter()
            .find(|(ip, o)| *o == owner && subnet.contains(*ip))
        {
            return Ok(*ip);
        }
        let last_path = self.dir.join("last_reserved_ip.0");
        let last = fs::read_to_string(&last_path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let ip = choose(subnet, &taken, last).ok_or(IpamError::Exhausted(subnet))?;
        let p = self.dir.join(ip.to_string());
        // Write then rename, so a crash never leaves a half-written reservation.
        let tmp = self.dir.join(format!(".{ip}.tmp"));
        fs::write(&tmp, format!("{}\n{}\n", owner.container_id, owner.ifname))
            .map_err(self.io(&tmp))?;
        fs::rename(&tmp, &p).map_err(self.io(&p))?;
        fs::write(&last_path, ip.to_string()).map_err(self.io(&last_path))?;
        Ok(ip)
    }

    /// Release whatever `owner` holds; returns the addresses released.
    pub fn release(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, IpamError> {
        let _l = self.lock()?;
        let mut freed = Vec::new();
        for (ip, o) in self.read_all()? {
            if &o == owner {
                let p = self.dir.join(ip.to_string());
                match fs::remove_file(&p) {
                    Ok(()) => freed.push(ip),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(IpamError::Io { path: p, source: e }),
                }
            }
        }
        Ok(freed)
    }

    /// The address `owner` holds, if any.
    pub fn lookup(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|(_, o)| o == owner)
            .map(|(ip, _)| ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owner(i: usize) -> Owner {
        Owner {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tweed-ipam-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn usable_skips_network_and_broadcast() {
        let s: Ipv4Net = "10.244.1.0/30".parse().unwrap();
        let v: Vec<_> = usable(s).map(|a| a.to_string()).collect();
        assert_eq!(v, ["10.244.1.1", "10.244.1.2"]);
    }

    #[test]
    fn allocate_is_idempotent_round_robin_and_exhausts() {
        let d = tmpdir("rr");
        let st = Store::new(&d);
        let s: Ipv4Net = "10.244.1.0/29".parse().unwrap();
        let a = st.allocate(s, &owner(1)).unwrap();
        assert_eq!(a.to_string(), "10.244.1.1");
        assert_eq!(
            st.allocate(s, &owner(1)).unwrap(),
            a,
            "same owner, same address"
        );
        let b = st.allocate(s, &owner(2)).unwrap();
        assert_eq!(st.release(&owner(1)).unwrap(), vec![a]);
        let c = st.allocate(s, &owner(3)).unwrap();
        assert!(c > b, "round robin does not reuse {a} at once: got {c}");
        for i in 4..20 {
            if let Err(e) = st.allocate(s, &owner(i)) {
                assert!(matches!(e, IpamError::Exhausted(_)));
                assert_eq!(st.list().unwrap().len(), 6);
                fs::remove_dir_all(&d).unwrap();
                return;
            }
        }
        panic!("a /29 never ran out");
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let d = tmpdir("conc");
        let s: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let d = d.clone();
                std::thread::spawn(move || Store::new(d).allocate(s, &owner(i)).unwrap())
            })
            .collect();
        let mut ips: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 40);
        fs::remove_dir_all(&d).unwrap();
    }

    proptest! {
        #[test]
        fn choose_never_returns_taken_or_reserved(taken_bits in proptest::collection::vec(any::<bool>(), 14), last in 0u8..20) {
            let s: Ipv4Net = "10.244.7.0/28".parse().unwrap();
            let mut taken = BTreeMap::new();
            for (i, t) in taken_bits.iter().enumerate() {
                if *t { taken.insert(Ipv4Addr::new(10, 244, 7, i as u8 + 1), owner(i)); }
            }
            let got = choose(s, &taken, Some(Ipv4Addr::new(10, 244, 7, last)));
            match got {
                Some(ip) => {
                    prop_assert!(!taken.contains_key(&ip));
                    prop_assert!(ip != s.network() && ip != s.broadcast() && s.contains(&ip));
                }
                None => prop_assert_eq!(taken.len(), 14),
            }
        }
    }
}
