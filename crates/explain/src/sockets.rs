//! Which sockets of this network namespace listen where (read-only:
//! `/proc/net/{tcp,udp}[6]`), so a trace can tell a delivered packet from
//! one the kernel refuses because nothing listens.

use std::net::Ipv4Addr;

/// Does a socket of this network namespace take `proto` packets to
/// `ip:port` (a TCP listener, or a bound UDP socket), on that address or a
/// wildcard? `None` when `/proc/net` cannot be read.
pub fn listening(proto: &str, ip: Ipv4Addr, port: u16) -> Option<bool> {
    let mut any = None;
    for (file, v6) in [(proto.to_string(), false), (format!("{proto}6"), true)] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/net/{file}")) {
            let hit = sockets_listening(&text, v6, proto == "tcp", ip, port);
            any = Some(any.unwrap_or(false) || hit);
        }
    }
    any
}

/// The parser behind [`listening`]: `/proc/net/{tcp,udp}[6]` text.
pub fn sockets_listening(text: &str, v6: bool, tcp: bool, ip: Ipv4Addr, port: u16) -> bool {
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
            return false;
        };
        // TCP: LISTEN (0A); UDP: any bound socket (07, unconnected).
        if (tcp && *state != "0A") || (!tcp && *state != "07") {
            return false;
        }
        let Some((addr, p)) = local.split_once(':') else {
            return false;
        };
        if u16::from_str_radix(p, 16).ok() != Some(port) {
            return false;
        }
        // The kernel prints the address's 32-bit words in host byte order.
        let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
        if v6 {
            // `::` (a dual-stack wildcard) or `::ffff:a.b.c.d`.
            addr.chars().all(|c| c == '0')
                || (addr.len() == 32
                    && addr[..16].chars().all(|c| c == '0')
                    && word(&addr[16..24]) == Some(0xffff_0000u32.to_be().to_ne_bytes())
                    && word(&addr[24..]).map(Ipv4Addr::from) == Some(ip))
        } else {
            word(addr)
                .map(Ipv4Addr::from)
                .is_some_and(|a| a == ip || a.is_unspecified())
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn sockets_listening_reads_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0A6433C6:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0050 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        let me: std::net::Ipv4Addr = "198.51.100.10".parse().unwrap();
        let other: std::net::Ipv4Addr = "198.51.100.11".parse().unwrap();
        // 0A6433C6 is 198.51.100.10 as a little-endian machine prints it.
        if cfg!(target_endian = "little") {
            assert!(super::sockets_listening(tcp, false, true, me, 8080));
            assert!(!super::sockets_listening(tcp, false, true, other, 8080));
        }
        // The wildcard listens on every address.
        assert!(super::sockets_listening(tcp, false, true, me, 8081));
        assert!(
            !super::sockets_listening(tcp, false, true, me, 80),
            "an established socket is no listener"
        );
        assert!(!super::sockets_listening(tcp, false, true, me, 8082));
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F92 00000000000000000000000000000000:0000 0A 0
";
        assert!(super::sockets_listening(tcp6, true, true, me, 8082));
        let udp = "  sl  local_address rem_address   st
   0: 00000000:14E9 00000000:0000 07 0
";
        assert!(super::sockets_listening(udp, false, false, me, 5353));
        assert!(!super::sockets_listening(udp, false, false, me, 53));
    }
}
