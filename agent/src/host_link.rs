//! The host's end of the host link (see `opencloud_protocol::link`): one
//! TCP listener for every session of this host. A gateway connects with TLS
//! 1.3 asking for `{sid}.h{id}.hosts.opencloud.internal`; the agent answers
//! with the certificate control issued to this host and accepts only a
//! client certificate from control's host CA that names the gateway with
//! EKU clientAuth (`GatewaysOnly`), so another host's certificate, or this
//! host's own, opens nothing. Then the connection is spliced to the sid's
//! Jupyter server, which listens only where the agent can reach it.
//!
//! A plain `GET /healthz` answers `ok` for the gateways' reachability probe
//! (told apart by its first byte: TLS starts with a handshake record);
//! anything else is refused before a byte reaches a session.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opencloud_protocol::link::{
    parse_session_server_name, LinkCertificate, GATEWAY_NAME, HEALTH_REQUEST_LINE, MAX_LINE,
    TLS_HANDSHAKE_BYTE,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A peer gets this long to finish the handshake (or its health request).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who this host is on the link, as control certified it at registration.
#[derive(Clone)]
pub struct LinkIdentity {
    pub host_id: u64,
    tls: Arc<ServerConfig>,
}

impl std::fmt::Debug for LinkIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkIdentity")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

impl LinkIdentity {
    /// Host `host_id` serving `certificate` (issued for `key_pem`, PEM),
    /// accepting the gateways of the CA that came with it.
    pub fn new(
        host_id: u64,
        certificate: &LinkCertificate,
        key_pem: &str,
    ) -> Result<Self, IdentityError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| IdentityError(format!("{what}: {e}"));
        let ca = CertificateDer::from_pem_slice(certificate.ca.as_bytes())
            .map_err(|e| failed("the host CA", &e))?;
        let leaf = CertificateDer::from_pem_slice(certificate.certificate.as_bytes())
            .map_err(|e| failed("the certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| failed("the link key", &e))?;
        let provider = Arc::new(crypto_provider());
        let mut roots = RootCertStore::empty();
        roots.add(ca).map_err(|e| failed("the host CA", &e))?;
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| failed("the gateway verifier", &e))?;
        let tls = ServerConfig::builder_with_provider(provider)
            // Both ends are ours: no reason to speak anything older.
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| failed("TLS", &e))?
            .with_client_cert_verifier(Arc::new(GatewaysOnly(webpki)))
            // Also checks that the key is the certificate's.
            .with_single_cert(vec![leaf], key)
            .map_err(|e| failed("the certificate and key", &e))?;
        Ok(Self {
            host_id,
            tls: Arc::new(tls),
        })
    }
}

/// The link's TLS cannot be set up with what control issued.
#[derive(Debug, thiserror::Error)]
#[error("host link certificate: {0}")]
pub struct IdentityError(String);

/// The link's cryptography. ring has no post-quantum key exchange (rustls
/// 0.23.48 deprecates it for that), but aws-lc-rs needs a C toolchain on
/// every host, and both ends of the link are ours.
#[allow(deprecated)]
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Accepts a client certificate only if the host CA's own checks pass
/// (chain, validity, EKU allows clientAuth) and it is a gateway's: EKU
/// clientAuth present and the gateway's name among its DNS names. A host's
/// certificate (serverAuth only, its own names) fails both.
#[derive(Debug)]
struct GatewaysOnly(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for GatewaysOnly {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)?;
        if is_gateway_certificate(end_entity) {
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
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// EKU clientAuth is listed (webpki lets a certificate without an EKU
/// extension through) and the gateway's name is among the DNS names.
fn is_gateway_certificate(der: &[u8]) -> bool {
    let Ok((_, certificate)) = X509Certificate::from_der(der) else {
        return false;
    };
    let client = matches!(certificate.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth);
    let named = matches!(
        certificate.subject_alternative_name(),
        Ok(Some(san)) if san.value.general_names.iter().any(|name| {
            matches!(name, GeneralName::DNSName(dns) if dns.eq_ignore_ascii_case(GATEWAY_NAME))
        })
    );
    client && named
}

/// Where a session's server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The session's private socket (what the agent's sessions use).
    Unix(PathBuf),
    /// A TCP address (servers started by tests and benchmarks).
    Tcp(SocketAddr),
}

/// The sessions a link may reach: only running ones of this host.
pub trait Sessions: Send + Sync + 'static {
    fn target(&self, sid: &str) -> Option<Target>;
}

/// Serves the link until `stop` turns true. Before `identity` holds a
/// certificate (the agent has not registered yet) only `/healthz` answers;
/// a new identity (a renewed certificate) applies to the next connection.
pub async fn serve(
    listener: TcpListener,
    identity: watch::Receiver<Option<LinkIdentity>>,
    sessions: Arc<dyn Sessions>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("host link accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let identity = identity.borrow().clone();
        let sessions = sessions.clone();
        let mut stopped = stop.clone();
        tokio::spawn(async move {
            // A stopped link ends its open connections too, as a host that
            // goes away does.
            let outcome = tokio::select! {
                outcome = connection(tcp, identity, sessions.as_ref()) => outcome,
                _ = stopped.wait_for(|s| *s) => Outcome::Stopped,
            };
            metrics::counter!("opencloud_agent_link_connections_total", "outcome" => outcome.label())
                .increment(1);
            if let Outcome::Refused(reason) = &outcome {
                tracing::warn!(%peer, "host link refused: {reason}");
            }
        });
    }
}

enum Outcome {
    Health,
    Spliced,
    Stopped,
    NoSession,
    Refused(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Health => "health",
            Outcome::Spliced => "spliced",
            Outcome::Stopped => "stopped",
            Outcome::NoSession => "no_session",
            Outcome::Refused(_) => "refused",
        }
    }
}

/// What a gateway that proved itself gets for a sid this host does not run.
const NO_SESSION: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
    content-length: 41\r\nconnection: close\r\n\r\nthis session is not running on this host\n";

async fn connection(
    tcp: TcpStream,
    identity: Option<LinkIdentity>,
    sessions: &dyn Sessions,
) -> Outcome {
    let _ = tcp.set_nodelay(true);
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, open(tcp, identity)).await;
    let (mut tls, sid) = match opened {
        Ok(Ok(Opened::Health)) => return Outcome::Health,
        Ok(Ok(Opened::Link { tls, sid })) => (tls, sid),
        Ok(Err(reason)) => return Outcome::Refused(reason),
        Err(_) => return Outcome::Refused("handshake timed out".into()),
    };
    let Some(target) = sessions.target(&sid) else {
        // Only a gateway gets this far, so it may know why.
        let _ = tls.write_all(NO_SESSION).await;
        let _ = tls.shutdown().await;
        return Outcome::NoSession;
    };
    let spliced = match &target {
        Target::Unix(path) => match UnixStream::connect(path).await {
            Ok(upstream) => splice(tls, upstream).await,
            Err(e) => Err(e),
        },
        Target::Tcp(addr) => match TcpStream::connect(addr).await {
            Ok(upstream) => {
                let _ = upstream.set_nodelay(true);
                splice(tls, upstream).await
            }
            Err(e) => Err(e),
        },
    };
    if let Err(e) = spliced {
        // The server closed or went away: the gateway sees the connection
        // end, like any upstream that stopped.
        tracing::debug!(sid, "host link to {target:?}: {e}");
    }
    Outcome::Spliced
}

type LinkStream = tokio_rustls::server::TlsStream<TcpStream>;

enum Opened {
    Health,
    /// A gateway, for session `sid` (boxed: a TLS stream is large, and a
    /// health probe carries nothing).
    Link {
        tls: Box<LinkStream>,
        sid: String,
    },
}

/// Answers a health probe, or completes the TLS handshake with a gateway
/// that asked for one of this host's sessions.
async fn open(tcp: TcpStream, identity: Option<LinkIdentity>) -> Result<Opened, String> {
    let mut first = [0u8; 1];
    let peeked = tcp.peek(&mut first).await.map_err(|e| e.to_string())?;
    if peeked == 0 {
        return Err("closed before saying anything".into());
    }
    if first[0] != TLS_HANDSHAKE_BYTE {
        return plaintext(tcp).await.map(|()| Opened::Health);
    }
    let Some(identity) = identity else {
        return Err("not registered with control yet".into());
    };
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|e| format!("not a TLS client hello: {e}"))?;
    let asked = start.client_hello().server_name().map(str::to_owned);
    let Some((sid, host)) = asked.as_deref().and_then(parse_session_server_name) else {
        return Err(format!("asked for {asked:?}, not a session of a host"));
    };
    if host != identity.host_id {
        return Err(format!(
            "the gateway asked for host {host}, this is host {}",
            identity.host_id
        ));
    }
    let sid = sid.to_owned();
    let tls = start
        .into_stream(identity.tls)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(Opened::Link {
        tls: Box::new(tls),
        sid,
    })
}

/// The health probe gets `ok`; any other plaintext gets a 400.
async fn plaintext(mut tcp: TcpStream) -> Result<(), String> {
    let line = read_line(&mut tcp).await?;
    if line == HEALTH_REQUEST_LINE {
        let _ = tcp
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
                  content-length: 3\r\nconnection: close\r\n\r\nok\n",
            )
            .await;
        return Ok(());
    }
    let _ = tcp
        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await;
    Err("neither TLS nor a health probe".into())
}

/// Reads the first line (without its line end).
async fn read_line(tcp: &mut TcpStream) -> Result<String, String> {
    let mut buffer = Vec::with_capacity(MAX_LINE);
    loop {
        if let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            buffer.truncate(end);
            if buffer.last() == Some(&b'\r') {
                buffer.pop();
            }
            return String::from_utf8(buffer).map_err(|_| "a request line is text".into());
        }
        if buffer.len() > MAX_LINE {
            return Err("request line too long".into());
        }
        let mut chunk = [0u8; MAX_LINE];
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed in the request line".into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Copies both ways until either side closes.
async fn splice<U>(mut tls: Box<LinkStream>, mut upstream: U) -> std::io::Result<()>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(&mut tls, &mut upstream).await?;
    Ok(())
}

/// Dials the host link at `addr` as a gateway does: trusting `ca` (PEM)
/// alone, presenting `client` (certificate and key, PEM) if given, asking
/// for session `sid` of host `host`; sends `request` and reads the answer to
/// its end. For trying a link from outside (tests, tools); the gateway's own
/// connections are Pingora's.
pub async fn dial(
    addr: SocketAddr,
    ca: &str,
    client: Option<(&str, &str)>,
    (sid, host): (&str, u64),
    request: &[u8],
) -> Result<String, String> {
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(ca.as_bytes()).map_err(|e| e.to_string())?;
    roots.add(ca).map_err(|e| e.to_string())?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match client {
        Some((certificate, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(certificate.as_bytes())
                    .map_err(|e| e.to_string())?],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from(
        opencloud_protocol::link::session_server_name(sid, host),
    )
    .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // In TLS 1.3 a refused client certificate shows on the first read.
    tls.write_all(request).await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use opencloud_protocol::link::{host_name, host_wildcard};
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    use std::collections::HashMap;

    const SID: &str = "abcdefghijklmnopqrstuvwxyz";
    const HOST: u64 = 7;

    /// A CA like control's, able to issue what control would refuse too.
    struct TestCa {
        issuer: rcgen::Certificate,
        key: KeyPair,
    }

    /// A certificate and its key, PEM.
    struct Issued {
        certificate: String,
        key: String,
    }

    impl TestCa {
        fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, "test host CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            let issuer = params.self_signed(&key).unwrap();
            Self { issuer, key }
        }

        fn issue(&self, names: &[String], usage: ExtendedKeyUsagePurpose) -> Issued {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names.to_vec()).unwrap();
            params.extended_key_usages = vec![usage];
            let certificate = params.signed_by(&key, &self.issuer, &self.key).unwrap();
            Issued {
                certificate: certificate.pem(),
                key: key.serialize_pem(),
            }
        }

        fn gateway(&self) -> Issued {
            self.issue(&[GATEWAY_NAME.into()], ExtendedKeyUsagePurpose::ClientAuth)
        }

        fn host(&self, id: u64) -> Issued {
            self.issue(
                &[host_name(id), host_wildcard(id)],
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        }
    }

    struct Fixed(HashMap<String, Target>);

    impl Sessions for Fixed {
        fn target(&self, sid: &str) -> Option<Target> {
            self.0.get(sid).cloned()
        }
    }

    /// An upstream that answers every connection with one fixed response.
    async fn upstream(body: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut request = vec![0u8; 1024];
                let _ = tcp.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    /// Host `HOST`'s link with a certificate from `ca`, serving one
    /// session; `registered: false` plays an agent control has not answered.
    async fn link(ca: &TestCa, registered: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = upstream("secret notebook").await;
        let sessions = Fixed(HashMap::from([(SID.to_owned(), Target::Tcp(target))]));
        let host = ca.host(HOST);
        let certificate = LinkCertificate {
            certificate: host.certificate,
            ca: ca.issuer.pem(),
            not_before: 0,
            not_after: u64::MAX,
        };
        let identity = LinkIdentity::new(HOST, &certificate, &host.key).unwrap();
        let (_, identity) = watch::channel(registered.then_some(identity));
        let (stop_tx, stop) = watch::channel(false);
        std::mem::forget(stop_tx);
        tokio::spawn(serve(listener, identity, Arc::new(sessions), stop));
        addr
    }

    /// Connects as a gateway trusting `ca`, presenting `client` (if any),
    /// asks for session `sid` of host `host` and sends one request; returns
    /// what came back, or why nothing did.
    async fn as_gateway(
        addr: SocketAddr,
        ca: &TestCa,
        client: Option<&Issued>,
        host: u64,
        sid: &str,
    ) -> Result<String, String> {
        let client = client.map(|c| (c.certificate.as_str(), c.key.as_str()));
        let request = b"GET /api/contents HTTP/1.1\r\nhost: x\r\n\r\n";
        dial(addr, &ca.issuer.pem(), client, (sid, host), request).await
    }

    #[tokio::test]
    async fn a_gateway_reaches_the_session_it_names() {
        let ca = TestCa::new();
        let addr = link(&ca, true).await;
        let answer = as_gateway(addr, &ca, Some(&ca.gateway()), HOST, SID).await;
        assert!(answer.unwrap().ends_with("secret notebook"));
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_gets_nothing() {
        let ca = TestCa::new();
        let addr = link(&ca, true).await;
        let answer = as_gateway(addr, &ca, None, HOST, SID).await;
        assert!(answer.is_err(), "{answer:?}");
    }

    #[tokio::test]
    async fn a_hosts_own_certificate_is_no_client_certificate() {
        let ca = TestCa::new();
        let addr = link(&ca, true).await;
        for host in [HOST, HOST + 1] {
            let answer = as_gateway(addr, &ca, Some(&ca.host(host)), HOST, SID).await;
            assert!(answer.is_err(), "host {host}'s certificate: {answer:?}");
        }
    }

    #[tokio::test]
    async fn only_a_client_certificate_naming_the_gateway_for_client_auth_opens_the_link() {
        let ca = TestCa::new();
        let addr = link(&ca, true).await;
        let wrong = [
            // The right usage, another name.
            ca.issue(
                &["mallory.example".into()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
            // The right name, another usage.
            ca.issue(&[GATEWAY_NAME.into()], ExtendedKeyUsagePurpose::ServerAuth),
            // The gateway's name and usage, from another CA.
            TestCa::new().gateway(),
        ];
        for client in &wrong {
            let answer = as_gateway(addr, &ca, Some(client), HOST, SID).await;
            assert!(answer.is_err(), "{answer:?}");
        }
    }

    #[tokio::test]
    async fn a_gateway_asking_for_another_host_gets_no_handshake() {
        let ca = TestCa::new();
        let addr = link(&ca, true).await;
        let answer = as_gateway(addr, &ca, Some(&ca.gateway()), HOST + 1, SID).await;
        assert!(answer.is_err(), "{answer:?}");
    }

    #[tokio::test]
    async fn before_registering_the_link_opens_for_nobody() {
        let ca = TestCa::new();
        let addr = link(&ca, false).await;
        let answer = as_gateway(addr, &ca, Some(&ca.gateway()), HOST, SID).await;
        assert!(answer.is_err(), "{answer:?}");
    }

    #[tokio::test]
    async fn an_unknown_session_gets_a_plain_refusal() {
        let ca = TestCa::new();
        let addr = link(&ca, true).await;
        let answer = as_gateway(
            addr,
            &ca,
            Some(&ca.gateway()),
            HOST,
            "bbcdefghijklmnopqrstuvwxyz",
        )
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(!answer.contains("secret notebook"));
    }

    #[tokio::test]
    async fn health_answers_and_plain_http_is_refused() {
        let ca = TestCa::new();
        let addr = link(&ca, true).await;
        for (request, expected) in [
            (
                "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
                "HTTP/1.1 200 OK",
            ),
            (
                "GET /api/contents HTTP/1.1\r\nhost: x\r\n\r\n",
                "HTTP/1.1 400",
            ),
        ] {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with(expected), "{request}: {answer}");
            assert!(!answer.contains("secret notebook"));
        }
    }
}
