//! go-plugin AutoMTLS.
//!
//! The client passes its own self-signed certificate in `PLUGIN_CLIENT_CERT` (PEM). We generate
//! a fresh self-signed server certificate for "localhost", announce it on the handshake line,
//! and accept only TLS clients presenting exactly the certificate we were given.
//!
//! go-plugin's client certificate is marked as a CA, which standard WebPKI path building
//! rejects as an end-entity certificate; pinning the exact DER (and still verifying the
//! handshake signature with its key) is both simpler and stricter.
//!
//! The crypto provider is ring, not aws-lc-rs: aws-lc seeds its DRBG with CPU jitter entropy on
//! first use, ~20 ms that every provider start (every plan) would pay before the handshake
//! line. ring has no P-521, and go-plugin's client keys are P-521, so that one signature
//! scheme is verified with the RustCrypto `p521` crate.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("PLUGIN_CLIENT_CERT does not contain a PEM certificate: {0}")]
    ClientCertPem(String),
    #[error("PLUGIN_CLIENT_CERT is not a valid X.509 certificate: {0}")]
    ClientCertX509(String),
    #[error("generating the server certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("building the TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// Server side of AutoMTLS, ready to accept connections.
pub struct AutoMtls {
    pub config: Arc<rustls::ServerConfig>,
    /// DER of our certificate, for the handshake line.
    pub server_cert_der: Vec<u8>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies an ECDSA P-521/SHA-512 handshake signature made with `cert`'s key.
pub fn verify_p521(
    message: &[u8],
    cert: &CertificateDer<'_>,
    signature: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    use p521::ecdsa::signature::Verifier as _;
    use p521::pkcs8::DecodePublicKey as _;
    let bad = |_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let spki = ee.subject_public_key_info();
    let key = p521::PublicKey::from_public_key_der(spki.as_ref())
        .map(|k| p521::ecdsa::VerifyingKey::from_affine(*k.as_affine()))
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let sig = p521::ecdsa::Signature::from_der(signature).map_err(bad)?;
    key.verify(message, &sig).map_err(bad)?;
    Ok(HandshakeSignatureValid::assertion())
}

/// Parses the client's PEM certificate and checks it is a real X.509 certificate.
pub fn parse_client_cert(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::ClientCertPem(e.to_string()))?;
    webpki::EndEntityCert::try_from(&der)
        .map_err(|e| TlsError::ClientCertX509(format!("{e:?}")))?;
    Ok(der)
}

pub fn auto_mtls(client_cert_pem: &str) -> Result<AutoMtls, TlsError> {
    let client = parse_client_cert(client_cert_pem)?;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let server_der = certified.cert.der().to_vec();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = provider();
    let verifier = Arc::new(PinnedClientCert {
        expected: client,
        algs: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![CertificateDer::from(server_der.clone())], key)?;
    // grpc-go clients refuse servers that do not negotiate h2 through ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(AutoMtls {
        config: Arc::new(config),
        server_cert_der: server_der,
    })
}

#[derive(Debug)]
struct PinnedClientCert {
    expected: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // An empty hint list makes Go clients send their (only) certificate unconditionally.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.expected.as_ref() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(message, cert, dss.signature());
        }
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(message, cert, dss.signature());
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let mut s = self.algs.supported_schemes();
        s.push(SignatureScheme::ECDSA_NISTP521_SHA512);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_client_cert_is_rejected_with_a_message() {
        let e = auto_mtls("not a certificate").err().unwrap();
        assert!(e.to_string().contains("PLUGIN_CLIENT_CERT"), "{e}");
        let bogus = "-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n";
        let e = auto_mtls(bogus).err().unwrap();
        assert!(matches!(e, TlsError::ClientCertX509(_)), "{e}");
    }

    #[test]
    fn real_client_cert_accepted() {
        let client = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let m = auto_mtls(&client.cert.pem()).unwrap();
        assert!(!m.server_cert_der.is_empty());
        assert_eq!(m.config.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
