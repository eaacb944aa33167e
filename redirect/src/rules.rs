//! The capture rule set of one pod, rendered for iptables (restore format) and nftables.
//!
//! Rendering is pure: the same [`RuleSet`] always produces the same text, which is also what
//! `check` compares the live state against.
//!
//! What is captured (DESIGN.md, "Capture rules"): outbound TCP not marked with the proxy's mark
//! and not to loopback goes to the outbound port (15001); inbound TCP to the HBONE port (15008) is
//! accepted as is; inbound TCP from the node's health-probe address is left alone, so kubelet
//! probes keep working; other inbound TCP goes to the inbound plaintext port (15006). DNS (UDP
//! and TCP to port 53, not marked, not to the pod's own loopback) goes to the DNS proxy (15053)
//! unless [`RuleSet::dns_port`] is `None`.
//!
//! Only a connection's first packet (a SYN without ACK) is redirected to 15001 and 15006: a pod
//! captured while it has connections open keeps them as they are (direct, outside the mesh) till
//! they end. Without this, the first packet of such a connection after the capture, picked up
//! by conntrack mid-stream as new, would be redirected to a port where no socket knows it and
//! the connection reset (the soak caught it on relabelling a namespace).
//!
//! Behind the capture stands a guard (filter table, output): a SYN leaving the pod that conntrack
//! did not take for a new connection and that carries no redirect is refused with a reset. The
//! redirect sees only new connections, so a SYN joined to an entry left from an earlier
//! connection on the same ports (the proxy's own, or one from before the capture) would
//! otherwise leave past the proxy, in plaintext.
//!
//! The client's address at the app ([`RuleSet::return_route`]): the proxy connects to the app
//! from the client's address (a transparent socket carrying its mark). Such a connection is
//! marked in conntrack when its first packet comes through the loopback interface, the app's
//! packets of it get the connection's mark back on output, and a policy-routing rule sends
//! packets with that mark to a table whose only route delivers everything locally: the app's
//! replies reach the proxy instead of leaving for the client's real address. (Istio's
//! istio-cni installs the same marks, table and rule, so either agent serves either proxy.)

use std::net::IpAddr;

/// Which rule engine renders and applies the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-restore` / `ip6tables-restore`, in our own chains of the nat table.
    Iptables,
    /// One `nft -f` transaction, in our own `inet` table.
    Nftables,
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(Backend::Iptables),
            "nftables" | "nft" => Ok(Backend::Nftables),
            other => Err(format!(
                "unknown backend {other:?}; expected iptables or nftables"
            )),
        }
    }
}

/// The ports, mark and exceptions of a pod's capture.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuleSet {
    /// Where outbound TCP is redirected (Istio: 15001).
    pub outbound_port: u16,
    /// Where inbound plaintext TCP is redirected (Istio: 15006).
    pub inbound_port: u16,
    /// The HBONE port, reached directly (Istio: 15008).
    pub hbone_port: u16,
    /// The mark the proxy puts on its own sockets (Istio: 0x539), matched under `mark_mask`.
    pub skip_mark: u32,
    /// The bits of the mark that are compared.
    pub mark_mask: u32,
    /// Source addresses whose inbound traffic is never captured (kubelet health probes; Istio's
    /// CNI SNATs probes to 169.254.7.127, IPv6 ones to fd16:9254:7127:1337:ffff:ffff:ffff:ffff).
    pub probe_sources: Vec<IpAddr>,
    /// Where the pod's DNS (UDP and TCP to port 53, not marked) is redirected (Istio: 15053, the
    /// proxy's DNS proxy), or `None` to leave DNS alone. UDP to the loopback interface and TCP
    /// to loopback addresses (a resolver inside the pod) are left alone.
    pub dns_port: Option<u16>,
    /// The return path of connections the proxy makes to the app from the client's address, or
    /// `None` to install none (the proxy must then connect from the pod's own address).
    pub return_route: Option<ReturnRoute>,
    /// Whether to install IPv6 rules too.
    pub ipv6: bool,
    /// How long each tool (`iptables-restore`, `nft`, ... run through `nsenter`) may take before
    /// it is killed and the step fails.
    pub tool_timeout: std::time::Duration,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            outbound_port: common::ports::OUTBOUND,
            inbound_port: common::ports::INBOUND_PLAINTEXT,
            hbone_port: common::ports::HBONE,
            skip_mark: common::PACKET_MARK,
            mark_mask: 0xfff,
            probe_sources: vec![
                crate::host::PROBE_SOURCE.into(),
                crate::host::PROBE_SOURCE_V6.into(),
            ],
            dns_port: Some(common::ports::DNS),
            return_route: Some(ReturnRoute::default()),
            ipv6: true,
            tool_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// How the app's packets of a connection the proxy made from the client's address come back to
/// the proxy: the connection's conntrack mark, the routing table that delivers locally, and the
/// priority of the rule that selects it (Istio's istio-cni: 0x111/0xfff and table 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnRoute {
    /// Put in conntrack on the proxy's packets that come through the loopback interface, and
    /// restored onto the connection's packets on output; compared under [`RuleSet::mark_mask`].
    pub mark: u32,
    /// The routing table holding only `local default dev lo`.
    pub table: u32,
    /// The priority of the rule `fwmark MARK/MASK iif lo lookup TABLE`.
    pub priority: u32,
}

impl Default for ReturnRoute {
    fn default() -> Self {
        ReturnRoute {
            mark: 0x111,
            table: 100,
            priority: 32764,
        }
    }
}

/// Our chain names in the nat table (iptables); the mangle table's chains have the same names.
pub const IPT_PREROUTING: &str = "ZTUNNEL_PREROUTING";
/// Our output chain (iptables).
pub const IPT_OUTPUT: &str = "ZTUNNEL_OUTPUT";
/// Our nftables table (family `inet`).
pub const NFT_TABLE: &str = "ztunnel";

impl RuleSet {
    /// Our part of `iptables-save -t nat` for one family: chain declarations, the jumps from the
    /// built-in chains, and our chains' rules, in the order iptables-save prints them.
    pub fn iptables_lines(&self, v6: bool) -> Vec<String> {
        let loopback = if v6 { "::1/128" } else { "127.0.0.0/8" };
        let mark = format!("0x{:x}/0x{:x}", self.skip_mark, self.mark_mask);
        let mut lines = vec![
            format!(":{IPT_OUTPUT} - [0:0]"),
            format!(":{IPT_PREROUTING} - [0:0]"),
            format!("-A PREROUTING -j {IPT_PREROUTING}"),
            format!("-A OUTPUT -j {IPT_OUTPUT}"),
            format!("-A {IPT_OUTPUT} -m mark --mark {mark} -j RETURN"),
        ];
        if let Some(dns) = self.dns_port {
            let local = if v6 { "::1/128" } else { "127.0.0.1/32" };
            lines.push(format!(
                "-A {IPT_OUTPUT} ! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-ports {dns}"
            ));
            lines.push(format!(
                "-A {IPT_OUTPUT} ! -d {local} -p tcp -m tcp --dport 53 -j REDIRECT --to-ports {dns}"
            ));
        }
        lines.extend([
            format!("-A {IPT_OUTPUT} -o lo -j RETURN"),
            format!("-A {IPT_OUTPUT} -d {loopback} -j RETURN"),
            format!(
                "-A {IPT_OUTPUT} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports {}",
                self.outbound_port
            ),
            format!("-A {IPT_PREROUTING} -i lo -j RETURN"),
        ]);
        for source in self.probe_sources.iter().filter(|s| s.is_ipv6() == v6) {
            let len = if v6 { 128 } else { 32 };
            lines.push(format!(
                "-A {IPT_PREROUTING} -s {source}/{len} -p tcp -j RETURN"
            ));
        }
        lines.push(format!(
            "-A {IPT_PREROUTING} -p tcp -m tcp --dport {} -j RETURN",
            self.hbone_port
        ));
        lines.push(format!(
            "-A {IPT_PREROUTING} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports {}",
            self.inbound_port
        ));
        lines
    }

    /// Our part of `iptables-save -t filter` for one family: the guard behind the capture. The
    /// nat table sees only a connection's first packet, and only when conntrack takes it for a
    /// new connection; a SYN that conntrack joins to an entry left from before (a connection on
    /// the same ports that was not redirected: the proxy's own, marked, or one from before the
    /// capture, when the entry was not reopened) skips the redirect and would leave the pod
    /// past the proxy, in plaintext. Such a SYN (not new, not redirected) is refused with a
    /// reset instead: the app's connect fails, and it connects again from another port.
    pub fn iptables_filter_lines(&self) -> Vec<String> {
        let mark = format!("0x{:x}/0x{:x}", self.skip_mark, self.mark_mask);
        vec![
            format!(":{IPT_OUTPUT} - [0:0]"),
            format!("-A OUTPUT -j {IPT_OUTPUT}"),
            format!("-A {IPT_OUTPUT} -m mark --mark {mark} -j RETURN"),
            format!("-A {IPT_OUTPUT} -o lo -j RETURN"),
            format!(
                "-A {IPT_OUTPUT} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack ! --ctstate NEW,DNAT -j REJECT --reject-with tcp-reset"
            ),
        ]
    }

    /// Our part of `iptables-save -t mangle` for one family (empty without a
    /// [`RuleSet::return_route`]): the conntrack mark of the proxy's connections to the app and
    /// its restoring onto their packets on output.
    pub fn iptables_mangle_lines(&self) -> Vec<String> {
        let Some(ret) = self.return_route else {
            return Vec::new();
        };
        let mask = self.mark_mask;
        vec![
            format!(":{IPT_OUTPUT} - [0:0]"),
            format!(":{IPT_PREROUTING} - [0:0]"),
            format!("-A PREROUTING -j {IPT_PREROUTING}"),
            format!("-A OUTPUT -j {IPT_OUTPUT}"),
            format!(
                "-A {IPT_OUTPUT} -m connmark --mark 0x{:x}/0x{mask:x} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                ret.mark
            ),
            format!(
                "-A {IPT_PREROUTING} -i lo -m mark --mark 0x{:x}/0x{mask:x} -j CONNMARK --set-xmark 0x{:x}/0x{mask:x}",
                self.skip_mark, ret.mark
            ),
        ]
    }

    /// The `ip rule` selector of the return route, as `ip rule add` takes it and `ip rule show`
    /// prints it after the priority (`from all fwmark 0x111/0xfff iif lo lookup 100`).
    pub fn return_rule(&self) -> Option<String> {
        self.return_route.map(|r| {
            format!(
                "from all fwmark 0x{:x}/0x{:x} iif lo lookup {}",
                r.mark, self.mark_mask, r.table
            )
        })
    }

    /// The nftables table, as one `nft -f` script that replaces any previous copy atomically.
    pub fn nft_script(&self) -> String {
        format!(
            "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{}",
            self.nft_table()
        )
    }

    /// The table definition (what `nft list table inet ztunnel` should show, modulo formatting).
    pub fn nft_table(&self) -> String {
        let mut pre = String::new();
        pre.push_str("        iifname \"lo\" return\n");
        for source in &self.probe_sources {
            let family = if source.is_ipv6() { "ip6" } else { "ip" };
            pre.push_str(&format!(
                "        {family} saddr {source} meta l4proto tcp return\n"
            ));
        }
        pre.push_str(&format!("        tcp dport {} return\n", self.hbone_port));
        pre.push_str(&format!(
            "        tcp flags syn / fin,syn,rst,ack redirect to :{}\n",
            self.inbound_port
        ));
        let mut out = String::new();
        out.push_str(&format!(
            "        meta mark & 0x{:08x} == 0x{:08x} return\n",
            self.mark_mask, self.skip_mark
        ));
        if let Some(dns) = self.dns_port {
            out.push_str(&format!(
                "        oifname != \"lo\" udp dport 53 redirect to :{dns}\n"
            ));
            out.push_str(&format!(
                "        ip daddr != 127.0.0.1 tcp dport 53 redirect to :{dns}\n"
            ));
            if self.ipv6 {
                out.push_str(&format!(
                    "        ip6 daddr != ::1 tcp dport 53 redirect to :{dns}\n"
                ));
            }
        }
        out.push_str("        oifname \"lo\" return\n");
        out.push_str("        ip daddr 127.0.0.0/8 return\n");
        if self.ipv6 {
            out.push_str("        ip6 daddr ::1 return\n");
        }
        out.push_str(&format!(
            "        tcp flags syn / fin,syn,rst,ack redirect to :{}\n",
            self.outbound_port
        ));
        let v4_only = if self.ipv6 {
            ""
        } else {
            "        meta nfproto ipv6 return\n"
        };
        let mut mangle = String::new();
        if let Some(ret) = self.return_route {
            // As `nft list` prints them (it folds the kept bits into the mask).
            let mask = self.mark_mask;
            mangle = format!(
                "    chain mangle_prerouting {{\n        type filter hook prerouting priority mangle; policy accept;\n{v4_only}        iifname \"lo\" meta mark & 0x{mask:08x} == 0x{:08x} ct mark set ct mark & 0x{:08x} | 0x{:08x}\n    }}\n    chain mangle_output {{\n        type route hook output priority mangle; policy accept;\n{v4_only}        ct mark & 0x{mask:08x} == 0x{:08x} meta mark set ct mark\n    }}\n",
                self.skip_mark,
                !mask | ret.mark,
                ret.mark,
                ret.mark,
            );
        }
        // The guard behind the capture (see `iptables_filter_lines`).
        let guard = format!(
            "    chain filter_output {{\n        type filter hook output priority filter; policy accept;\n{v4_only}        meta mark & 0x{:08x} == 0x{:08x} return\n        oifname \"lo\" return\n        tcp flags syn / fin,syn,rst,ack ct state != new ct status != dnat reject with tcp reset\n    }}\n",
            self.mark_mask, self.skip_mark
        );
        format!(
            "table inet {NFT_TABLE} {{\n    chain prerouting {{\n        type nat hook prerouting priority dstnat; policy accept;\n{v4_only}{pre}    }}\n    chain output {{\n        type nat hook output priority -100; policy accept;\n{v4_only}{out}    }}\n{guard}{mangle}}}\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_rules_cover_every_exception() {
        let lines = RuleSet::default().iptables_lines(false);
        let text = lines.join("\n");
        for needle in [
            "-A OUTPUT -j ZTUNNEL_OUTPUT",
            "-A ZTUNNEL_OUTPUT -m mark --mark 0x539/0xfff -j RETURN",
            "-A ZTUNNEL_OUTPUT -o lo -j RETURN",
            "-A ZTUNNEL_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A ZTUNNEL_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15001",
            "-A ZTUNNEL_PREROUTING -s 169.254.7.127/32 -p tcp -j RETURN",
            "-A ZTUNNEL_PREROUTING -p tcp -m tcp --dport 15008 -j RETURN",
            "-A ZTUNNEL_PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15006",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        // The exceptions come before the redirects.
        let pos = |s: &str| lines.iter().position(|l| l.contains(s)).unwrap();
        assert!(pos("--mark") < pos("--to-ports 15001"));
        assert!(pos("--dport 15008") < pos("--to-ports 15006"));
        let v6 = RuleSet::default().iptables_lines(true).join("\n");
        assert!(v6.contains("-d ::1/128") && !v6.contains("169.254"), "{v6}");
    }

    #[test]
    fn nft_script_replaces_the_table_in_one_transaction() {
        let script = RuleSet::default().nft_script();
        assert!(
            script
                .starts_with("table inet ztunnel\ndelete table inet ztunnel\ntable inet ztunnel {"),
            "{script}"
        );
        assert!(script.contains("meta mark & 0x00000fff == 0x00000539 return"));
        assert!(script.contains("redirect to :15001") && script.contains("redirect to :15006"));
        assert!(script.contains("tcp dport 15008 return"));
    }

    #[test]
    fn dns_is_captured_after_the_mark_exception_and_can_be_left_alone() {
        let lines = RuleSet::default().iptables_lines(false);
        let pos = |s: &str| lines.iter().position(|l| l.contains(s)).unwrap();
        assert!(pos("--mark") < pos("-p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"));
        assert!(pos("! -d 127.0.0.1/32 -p tcp -m tcp --dport 53") < pos("-o lo -j RETURN"));
        let v6 = RuleSet::default().iptables_lines(true).join("\n");
        assert!(v6.contains("! -d ::1/128 -p tcp -m tcp --dport 53"), "{v6}");
        let nft = RuleSet::default().nft_table();
        assert!(nft.contains("oifname != \"lo\" udp dport 53 redirect to :15053"));
        assert!(nft.contains("ip6 daddr != ::1 tcp dport 53 redirect to :15053"));
        let off = RuleSet {
            dns_port: None,
            ..RuleSet::default()
        };
        assert!(!off.iptables_lines(false).join("\n").contains("dport 53"));
        assert!(!off.nft_table().contains("dport 53"));
    }

    #[test]
    fn the_return_route_matches_istio_cni_and_can_be_left_out() {
        let rules = RuleSet::default();
        let mangle = rules.iptables_mangle_lines().join("\n");
        assert!(mangle.contains(
            "-A ZTUNNEL_PREROUTING -i lo -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"
        ), "{mangle}");
        assert!(
            mangle.contains(
                "-A ZTUNNEL_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark"
            ),
            "{mangle}"
        );
        assert_eq!(
            rules.return_rule().as_deref(),
            Some("from all fwmark 0x111/0xfff iif lo lookup 100")
        );
        let nft = rules.nft_table();
        assert!(
            nft.contains("type route hook output priority mangle"),
            "{nft}"
        );
        assert!(
            nft.contains("ct mark set ct mark & 0xfffff111 | 0x00000111"),
            "{nft}"
        );
        let off = RuleSet {
            return_route: None,
            ..RuleSet::default()
        };
        assert!(off.iptables_mangle_lines().is_empty());
        assert!(off.return_rule().is_none());
        assert!(!off.nft_table().contains("mangle"));
    }

    #[test]
    fn a_syn_that_skipped_the_redirect_is_refused_after_the_same_exceptions() {
        let lines = RuleSet::default().iptables_filter_lines();
        let text = lines.join("\n");
        assert!(text.contains("-A OUTPUT -j ZTUNNEL_OUTPUT"), "{text}");
        let pos = |s: &str| lines.iter().position(|l| l.contains(s)).unwrap();
        assert!(pos("--mark 0x539/0xfff -j RETURN") < pos("REJECT"));
        assert!(pos("-o lo -j RETURN") < pos("REJECT"));
        assert!(
            text.contains(
                "SYN -m conntrack ! --ctstate NEW,DNAT -j REJECT --reject-with tcp-reset"
            )
        );
        let nft = RuleSet::default().nft_table();
        assert!(
            nft.contains("ct state != new ct status != dnat reject with tcp reset"),
            "{nft}"
        );
    }

    #[test]
    fn backend_names() {
        assert_eq!("iptables".parse::<Backend>().unwrap(), Backend::Iptables);
        assert_eq!("nftables".parse::<Backend>().unwrap(), Backend::Nftables);
        assert!("ebpf".parse::<Backend>().is_err());
    }
}
