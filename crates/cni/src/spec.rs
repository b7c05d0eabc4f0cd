//! The CNI protocol's data: what arrives in the environment and on stdin,
//! and what goes back on stdout.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const CURRENT_VERSION: &str = "1.1.0";

/// The spec's well-known error codes (section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// tweed's own codes start at 100, as the spec reserves 0-99.
    pub const SUBNET_EXHAUSTED: u32 = 100;
    pub const CHECK_FAILED: u32 = 101;
    pub const DATAPLANE: u32 = 102;
    pub const HOSTPORT_CONFLICT: u32 = 103;
}

/// A CNI error result, printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: CURRENT_VERSION.to_string(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, d: impl std::fmt::Display) -> Self {
        self.details = d.to_string();
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not a CNI command"),
                ))
            }
        })
    }
}

/// The environment of one invocation, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

fn valid_container_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Interface names are at most 15 bytes and may not contain '/', ':' or whitespace.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Env {
    /// Read the CNI_* variables through `get` (the process environment in
    /// production, a map in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = Command::parse(&get("CNI_COMMAND").unwrap_or_default())?;
        let needs = |name: &str| -> Result<String, CniError> {
            match get(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is required for {command:?}"),
                )),
            }
        };
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
        };
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            env.container_id = needs("CNI_CONTAINERID")?;
            if !valid_container_id(&env.container_id) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_CONTAINERID {:?} must be alphanumeric, '_', '.' or '-'",
                        env.container_id
                    ),
                ));
            }
            env.ifname = needs("CNI_IFNAME")?;
            if !valid_ifname(&env.ifname) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_IFNAME {:?} is not a valid interface name", env.ifname),
                ));
            }
            // DEL may come after the namespace is gone; ADD and CHECK need it.
            env.netns = match get("CNI_NETNS").filter(|v| !v.is_empty()) {
                Some(p) => Some(PathBuf::from(p)),
                None if command == Command::Del => None,
                None => {
                    return Err(CniError::new(
                        code::INVALID_ENV,
                        format!("CNI_NETNS is required for {command:?}"),
                    ))
                }
            };
        }
        Ok(env)
    }
}

/// One attachment named in a GC request's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration on stdin: the runtime's fields plus tweed's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Where the agent writes the node's network state (node.json).
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Where address reservations live.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub runtime_config: BTreeMap<String, Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/tweed")
}

impl NetConf {
    /// Decode and validate the config. Bad JSON is code 6; JSON that is
    /// not a usable tweed config is code 7; an unsupported version is 1.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(code::DECODE, "network config is not valid JSON").details(e)
        })?;
        if !v.is_object() {
            return Err(CniError::new(
                code::DECODE,
                "network config must be a JSON object",
            ));
        }
        let version = v.get("cniVersion").and_then(Value::as_str).unwrap_or("");
        if version.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network config has no cniVersion",
            ));
        }
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {version:?} is not supported (supported: {})",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let conf: NetConf = serde_json::from_value(v).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "network config is not a valid tweed config",
            )
            .details(e)
        })?;
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network config has an empty name",
            ));
        }
        if let Some(m) = conf.mtu {
            if !(576..=65535).contains(&m) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("mtu {m} is out of range (576..=65535)"),
                ));
            }
        }
        Ok(conf)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/cni/networks").join(&self.name))
    }

    /// Result versions before 1.0.0 tag each IP with its family.
    pub fn legacy_result(&self) -> bool {
        self.cni_version.starts_with("0.")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
    pub address: String,
    pub gateway: String,
    pub interface: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub dst: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gw: Option<String>,
}

/// A successful ADD's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConfig>,
    pub dns: Value,
}

/// One `runtimeConfig.portMappings` entry (the `portMappings` capability).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

fn tcp() -> String {
    "tcp".into()
}

impl NetConf {
    /// The port mappings the runtime asked for, validated.
    pub fn port_mappings(&self) -> Result<Vec<(tweed_model::Protocol, u16, u16)>, CniError> {
        let Some(v) = self.runtime_config.get("portMappings") else {
            return Ok(Vec::new());
        };
        let maps: Vec<PortMapping> = serde_json::from_value(v.clone()).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "runtimeConfig.portMappings does not decode",
            )
            .details(e)
        })?;
        maps.iter()
            .map(|m| {
                let p = match m.protocol.to_ascii_lowercase().as_str() {
                    "tcp" => tweed_model::Protocol::TCP,
                    "udp" => tweed_model::Protocol::UDP,
                    "sctp" => tweed_model::Protocol::SCTP,
                    other => {
                        return Err(CniError::new(
                            code::INVALID_CONFIG,
                            format!("runtimeConfig.portMappings: unknown protocol {other:?}"),
                        ))
                    }
                };
                if m.host_port == 0 || m.container_port == 0 {
                    return Err(CniError::new(
                        code::INVALID_CONFIG,
                        "runtimeConfig.portMappings: hostPort and containerPort must be 1-65535",
                    ));
                }
                Ok((p, m.host_port, m.container_port))
            })
            .collect()
    }
}

pub fn version_result() -> Value {
    serde_json::json!({ "cniVersion": CURRENT_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn env_validation_codes() {
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            code::INVALID_ENV
        );
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ])
        .unwrap_err();
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "waytoolonginterface"),
            ("CNI_NETNS", "/x"),
        ])
        .unwrap_err();
        assert!(e.msg.contains("CNI_IFNAME"), "{e}");
        // DEL without a namespace is fine: the runtime may have removed it already.
        let d = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!((d.command, d.netns), (Command::Del, None));
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }

    #[test]
    fn config_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        assert_eq!(NetConf::parse(b"[1]").unwrap_err().code, code::DECODE);
        assert_eq!(
            NetConf::parse(br#"{"name":"n","type":"tweed"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"tweed"}"#)
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"tweed","mtu":"big"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"","type":"tweed"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        let c = NetConf::parse(br#"{"cniVersion":"0.4.0","name":"n","type":"tweed","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#).unwrap();
        assert!(c.legacy_result());
        assert_eq!(c.valid_attachments.as_ref().unwrap()[0].container_id, "c1");
        assert_eq!(c.data_dir(), PathBuf::from("/var/lib/cni/networks/n"));
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(7, "bad").details("field x");
        let j: Value = serde_json::to_value(&e).unwrap();
        assert_eq!(j["code"], 7);
        assert_eq!(j["cniVersion"], "1.1.0");
        assert_eq!(j["details"], "field x");
    }
}
