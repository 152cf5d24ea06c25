//! go-plugin handshake: magic cookie, protocol negotiation and the line printed on stdout.

use std::net::SocketAddr;

/// The cookie Terraform and OpenTofu set for every provider they start.
pub const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
pub const MAGIC_COOKIE_VALUE: &str =
    "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";
/// go-plugin's own protocol version (the first field of the handshake line).
pub const CORE_PROTOCOL_VERSION: u32 = 1;
/// Plugin protocol majors this binary serves, best first.
pub const SUPPORTED: [u32; 2] = [6, 5];
/// Restricts the majors this binary offers (e.g. `5`). go-plugin clients append their own
/// `PLUGIN_PROTOCOL_VERSIONS` after the inherited environment, so a user cannot narrow the
/// negotiation through that variable; this one passes through untouched.
pub const PIN_PROTOCOL_ENV: &str = "AGENTPLANE_PLUGIN_PROTOCOL";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HandshakeError {
    #[error(
        "terraform-provider-agentplane is a Terraform/OpenTofu provider plugin: `terraform` or `tofu` starts it \
         and talks to it over gRPC, so running it by hand does nothing useful.\n\
         Use it from a configuration with `required_providers {{ agentplane = {{ source = \"agentplane/agentplane\" }} }}`,\n\
         or run it with --debug to get a TF_REATTACH_PROVIDERS value for a debugger session."
    )]
    NotAPluginHost,
    #[error(
        "the client offers plugin protocol versions {offered:?} but this provider serves only 5 and 6; upgrade Terraform/OpenTofu"
    )]
    NoCommonVersion { offered: String },
}

/// Checks the magic cookie: its absence means a person (or a script) ran the binary directly.
pub fn check_cookie(value: Option<&str>) -> Result<(), HandshakeError> {
    match value {
        Some(v) if v == MAGIC_COOKIE_VALUE => Ok(()),
        _ => Err(HandshakeError::NotAPluginHost),
    }
}

/// Picks the protocol major from the client's `PLUGIN_PROTOCOL_VERSIONS` (comma separated),
/// optionally narrowed by [`PIN_PROTOCOL_ENV`]. Without the client variable the client
/// predates negotiation; we answer with our best version.
pub fn negotiate(offered: Option<&str>, pinned: Option<&str>) -> Result<u32, HandshakeError> {
    let ours: Vec<u32> = match pinned.map(parse_list).filter(|p| !p.is_empty()) {
        Some(p) => SUPPORTED
            .iter()
            .copied()
            .filter(|v| p.contains(v))
            .collect(),
        None => SUPPORTED.to_vec(),
    };
    let Some(offered) = offered.filter(|s| !s.trim().is_empty()) else {
        return ours
            .first()
            .copied()
            .ok_or_else(|| HandshakeError::NoCommonVersion {
                offered: String::new(),
            });
    };
    let versions = parse_list(offered);
    ours.into_iter()
        .find(|v| versions.contains(v))
        .ok_or_else(|| HandshakeError::NoCommonVersion {
            offered: offered.to_string(),
        })
}

fn parse_list(s: &str) -> Vec<u32> {
    s.split(',').filter_map(|v| v.trim().parse().ok()).collect()
}

/// `CORE|APP|tcp|ADDR|grpc|CERT` where CERT is the server certificate as unpadded standard
/// base64 of its DER (go-plugin decodes it with RawStdEncoding), empty without AutoMTLS.
pub fn line(proto: u32, addr: SocketAddr, cert_der: Option<&[u8]>) -> String {
    use base64::Engine as _;
    let cert = cert_der
        .map(|d| base64::engine::general_purpose::STANDARD_NO_PAD.encode(d))
        .unwrap_or_default();
    format!("{CORE_PROTOCOL_VERSION}|{proto}|tcp|{addr}|grpc|{cert}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie() {
        assert_eq!(check_cookie(None), Err(HandshakeError::NotAPluginHost));
        assert_eq!(
            check_cookie(Some("nope")),
            Err(HandshakeError::NotAPluginHost)
        );
        assert!(check_cookie(Some(MAGIC_COOKIE_VALUE)).is_ok());
    }

    #[test]
    fn negotiation_prefers_6() {
        assert_eq!(negotiate(Some("5,6"), None), Ok(6));
        assert_eq!(negotiate(Some("5"), None), Ok(5));
        assert_eq!(negotiate(Some(" 6 "), None), Ok(6));
        assert_eq!(negotiate(None, None), Ok(6));
        assert!(matches!(
            negotiate(Some("4,7"), None),
            Err(HandshakeError::NoCommonVersion { .. })
        ));
    }

    #[test]
    fn pinning_narrows_what_we_offer() {
        assert_eq!(negotiate(Some("5,6"), Some("5")), Ok(5));
        assert_eq!(negotiate(None, Some("5")), Ok(5));
        assert!(negotiate(Some("6"), Some("5")).is_err());
        assert_eq!(negotiate(Some("5,6"), Some("")), Ok(6));
    }

    #[test]
    fn line_format() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(line(6, addr, None), "1|6|tcp|127.0.0.1:4000|grpc|");
        // 4 bytes → 6 base64 chars without the "==" padding
        assert_eq!(
            line(5, addr, Some(&[1, 2, 3, 4])),
            "1|5|tcp|127.0.0.1:4000|grpc|AQIDBA"
        );
    }
}
