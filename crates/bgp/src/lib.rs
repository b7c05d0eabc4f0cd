//! BGP for tweed, as pure code: the cluster's BGP configuration and its
//! validation ([`config`]), which sessions one node opens and what it
//! announces ([`plan`]), the configuration of the speaker that does it
//! ([`bird`]: Debian's bird2, run by the agent as a separate process, as
//! Calico runs BIRD), and what the speaker reports ([`status`]).
//!
//! A real speaker rather than a Rust one: no crate runs BGP sessions as a
//! library today, and BIRD is GPL-2, which is fine for a program tweed
//! starts but not for code it links. The speaker sits behind the plan: a
//! second one (FRR) needs only its own renderer and status parser.

pub mod bird;
/// The configuration lives in `tweed-model`: the cluster config carries it.
pub use tweed_model::bgp as config;
pub mod plan;
pub mod status;

pub use config::{BgpConfig, BgpPeer};
pub use plan::{plan_bgp, BgpNode, BgpPlan, Session, SessionKind};
pub use status::{parse_bfd_sessions, parse_protocols, BfdSession, Diagnosis, ProtocolStatus};
