//! Measures a Terraform provider plugin the way go-plugin starts it: process start to handshake
//! line, and the latency of the first GetProviderSchema over AutoMTLS. Used by
//! `ci/bench/provider/run.sh` for our provider and the peers it compares against.
//!
//! ```text
//! cargo run --release -p terraform-provider-agentplane --example plugin_probe -- <provider-binary> [runs]
//! ```
//! Prints one line: `handshake_ms=<median> schema_ms=<median> protocol=<n>`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use terraform_provider_agentplane::plugin::tls::verify_p521;
use tfplugin_protocol::{tfplugin5, tfplugin6};

const COOKIE: (&str, &str) = (
    "TF_PLUGIN_MAGIC_COOKIE",
    "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2",
);

/// Accepts exactly the certificate announced on the handshake line (what go-plugin does by
/// making it the only root).
#[derive(Debug)]
struct Pinned(Vec<u8>, Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if ee.as_ref() == self.0.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "server certificate does not match the handshake".into(),
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if d.scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(m, c, d.signature());
        }
        rustls::crypto::verify_tls12_signature(m, c, d, &self.1.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if d.scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(m, c, d.signature());
        }
        rustls::crypto::verify_tls13_signature(m, c, d, &self.1.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        // Go plugin servers sign with P-521 keys.
        let mut s = self.1.signature_verification_algorithms.supported_schemes();
        s.push(SignatureScheme::ECDSA_NISTP521_SHA512);
        s
    }
}

/// A TLS stream over TCP or a unix socket (Go plugins listen on unix sockets by default).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

struct Run {
    handshake_ms: f64,
    schema_ms: f64,
    protocol: u32,
}

async fn one(
    bin: &str,
    client_pem: &str,
    client_der: &[u8],
    client_key: &[u8],
) -> Result<Run, Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .env(COOKIE.0, COOKIE.1)
        .env("PLUGIN_PROTOCOL_VERSIONS", "5,6")
        .env("PLUGIN_CLIENT_CERT", client_pem)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let handshake_ms = t0.elapsed().as_secs_f64() * 1e3;
    let f: Vec<&str> = line.trim_end().split('|').collect();
    if f.len() < 6 || (f[2] != "tcp" && f[2] != "unix") {
        return Err(format!("unexpected handshake line {line:?}").into());
    }
    let protocol: u32 = f[1].parse()?;
    let (network, addr) = (f[2].to_string(), f[3].to_string());
    let server_der =
        base64::engine::general_purpose::STANDARD_NO_PAD.decode(f[5].trim_end_matches('='))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned(server_der, provider)))
        .with_client_auth_cert(
            vec![CertificateDer::from(client_der.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.to_vec())),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, network, addr) = (connector.clone(), network.clone(), addr.clone());
            async move {
                let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                let io: Box<dyn Io> = if network == "unix" {
                    Box::new(
                        connector
                            .connect(name, tokio::net::UnixStream::connect(addr).await?)
                            .await?,
                    )
                } else {
                    Box::new(
                        connector
                            .connect(name, tokio::net::TcpStream::connect(addr).await?)
                            .await?,
                    )
                };
                Ok::<_, std::io::Error>(TokioIo::new(io))
            }
        }))
        .await?;
    let t1 = Instant::now();
    if protocol == 6 {
        tfplugin6::provider_client::ProviderClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .get_provider_schema(tfplugin6::get_provider_schema::Request {})
            .await?;
    } else {
        tfplugin5::provider_client::ProviderClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .get_schema(tfplugin5::get_provider_schema::Request {})
            .await?;
    }
    let schema_ms = t1.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    Ok(Run {
        handshake_ms,
        schema_ms,
        protocol,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let bin = args
        .next()
        .ok_or("usage: plugin_probe <provider-binary> [runs]")?;
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(20);
    let client = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (pem, der, key) = (
        client.cert.pem(),
        client.cert.der().to_vec(),
        client.signing_key.serialize_der(),
    );
    let (mut hs, mut sc, mut proto) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs {
        let r = one(&bin, &pem, &der, &key).await?;
        hs.push(r.handshake_ms);
        sc.push(r.schema_ms);
        proto = r.protocol;
    }
    println!(
        "handshake_ms={:.2} schema_ms={:.2} protocol={proto}",
        median(hs),
        median(sc)
    );
    Ok(())
}
