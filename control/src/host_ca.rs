//! Control's host CA: the certificate authority of the host link (see
//! `opencloud_protocol::link`). Its key (`host-ca.key`, 0600) and
//! certificate (`host-ca.pem`) live beside the keys file; both are made at
//! the first start, and a key others may read refuses the start.
//!
//! It signs certificate requests and decides every name itself: a host's
//! certificate names its id (`h{id}.hosts.…` and `*.h{id}.hosts.…`, EKU
//! serverAuth only), a gateway's names `gateway.opencloud.internal` (EKU
//! clientAuth only), whatever the request asked for. So a host cannot get a
//! certificate for another host, nor one a gateway would present.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use opencloud_protocol::config::{read_or_create_private_file, ConfigError};
use opencloud_protocol::link::{self, CertFingerprint, LinkCertificate};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The CA's private key, beside the keys file.
pub const KEY_FILE: &str = "host-ca.key";
/// The CA's certificate, beside its key.
pub const CERTIFICATE_FILE: &str = "host-ca.pem";
/// How long a link certificate is valid: short, since every end renews its
/// own well before (`LinkCertificate::renew_at`).
pub const LINK_CERTIFICATE_SECONDS: u64 = 30 * 86_400;
/// Issued certificates start this long before now, for peers whose clock
/// is a little behind control's.
const BACKDATE_SECONDS: u64 = 300;
/// The CA's own life; replacing it means every gateway fetching it again.
const CA_SECONDS: u64 = 10 * 365 * 86_400;

/// Who a certificate is for; this, not the request, decides its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Host `id`'s end of its link (the TLS server).
    Host(u64),
    /// Any gateway (the TLS client).
    Gateway,
}

/// Why the CA could not be opened; names the file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    File(#[from] ConfigError),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A certificate request control will not sign.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RequestError(&'static str);

/// A certificate just issued, and what the route table pins it by.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: LinkCertificate,
    pub fingerprint: CertFingerprint,
}

/// The CA, ready to sign. Cheap to clone.
#[derive(Clone)]
pub struct HostCa(Arc<Signer>);

struct Signer {
    /// The CA as an issuer: its name and key identifier.
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// What peers are given to trust.
    pem: String,
}

impl HostCa {
    /// Opens the CA in `dir`, making its key and certificate if there are
    /// none yet. A certificate left without its key is refused rather than
    /// replaced: every host and gateway trusts it.
    pub fn open(dir: &Path, now: u64) -> Result<Self, CaError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERTIFICATE_FILE);
        if !key_path.exists() && cert_path.exists() {
            return Err(invalid(
                &cert_path,
                format!("has no key beside it ({KEY_FILE}); restore the key, or remove both to make a new CA"),
            ));
        }
        let key_pem = read_or_create_private_file("host CA key", &key_path, link::new_private_key)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("not a private key in PEM: {e}")))?;
        let pem = match std::fs::read_to_string(&cert_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = new_ca_certificate(&key, now)
                    .map_err(|e| invalid(&cert_path, format!("cannot make it: {e}")))?;
                write_public_file(&cert_path, &pem)
                    .map_err(|e| invalid(&cert_path, format!("cannot write it: {e}")))?;
                tracing::info!(path = %cert_path.display(), "host CA made");
                pem
            }
            Err(e) => return Err(invalid(&cert_path, e.to_string())),
        };
        if public_key_of(&pem).as_deref() != Some(&key.public_key_der()[..]) {
            return Err(invalid(
                &cert_path,
                format!("is not the certificate of {KEY_FILE} beside it"),
            ));
        }
        let issuer = CertificateParams::from_ca_cert_pem(&pem)
            .and_then(|params| params.self_signed(&key))
            .map_err(|e| invalid(&cert_path, format!("not a CA certificate in PEM: {e}")))?;
        Ok(Self(Arc::new(Signer { issuer, key, pem })))
    }

    /// The CA certificate, PEM.
    pub fn certificate(&self) -> &str {
        &self.0.pem
    }

    /// A certificate for `holder` from `csr` (PEM, signed by its own ECDSA
    /// P-256 key), valid from a little before `now` for
    /// [`LINK_CERTIFICATE_SECONDS`].
    pub fn issue(&self, holder: Holder, csr: &str, now: u64) -> Result<Issued, RequestError> {
        let from = now.saturating_sub(BACKDATE_SECONDS);
        self.issue_for(holder, csr, from, now + LINK_CERTIFICATE_SECONDS)
    }

    /// [`HostCa::issue`] with the validity given (tests make expired ones).
    pub fn issue_for(
        &self,
        holder: Holder,
        csr: &str,
        not_before: u64,
        not_after: u64,
    ) -> Result<Issued, RequestError> {
        // Parsing checks the request's signature: it proves the key.
        let request = CertificateSigningRequestParams::from_pem(csr)
            .map_err(|_| RequestError("not a certificate request signed by its own key (PEM)"))?;
        if request.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(RequestError("the key must be ECDSA P-256"));
        }
        let (name, names, usage) = match holder {
            Holder::Host(id) => (
                link::host_name(id),
                vec![link::host_name(id), link::host_wildcard(id)],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            Holder::Gateway => (
                link::GATEWAY_NAME.to_owned(),
                vec![link::GATEWAY_NAME.to_owned()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = names
            .into_iter()
            .map(|n| n.try_into().map(SanType::DnsName))
            .collect::<Result<_, _>>()
            .map_err(|_| RequestError("a link name is not a DNS name"))?;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.not_before = datetime(not_before);
        params.not_after = datetime(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let signed = params
            .signed_by(&request.public_key, &self.0.issuer, &self.0.key)
            .map_err(|_| RequestError("the request could not be signed"))?;
        Ok(Issued {
            fingerprint: CertFingerprint::of(signed.der()),
            certificate: LinkCertificate {
                certificate: signed.pem(),
                ca: self.0.pem.clone(),
                not_before,
                not_after,
            },
        })
    }
}

fn invalid(path: &Path, message: String) -> CaError {
    CaError::Invalid {
        path: path.display().to_string(),
        message,
    }
}

fn new_ca_certificate(key: &KeyPair, now: u64) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "OpenCloud");
    params
        .distinguished_name
        .push(DnType::CommonName, "OpenCloud host link CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = datetime(now.saturating_sub(BACKDATE_SECONDS));
    params.not_after = datetime(now + CA_SECONDS);
    params.serial_number = Some(random_serial());
    Ok(params.self_signed(key)?.pem())
}

/// The certificate's SubjectPublicKeyInfo, DER.
fn public_key_of(pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let certificate = pem.parse_x509().ok()?;
    Some(certificate.public_key().raw.to_vec())
}

/// Writes `text` aside and renames it into place, so a reader never sees
/// half of it.
fn write_public_file(path: &Path, text: &str) -> std::io::Result<()> {
    let aside: PathBuf = path.with_extension(format!("new-{}", std::process::id()));
    std::fs::write(&aside, text)?;
    std::fs::rename(&aside, path)
}

/// 127 random bits: positive, unique for all practical purposes.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn datetime(unix: u64) -> time::OffsetDateTime {
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use x509_parser::extensions::GeneralName;

    const NOW: u64 = 1_750_000_000;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oc-host-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A request asking for everything control must not give.
    fn greedy_request(key: &KeyPair) -> String {
        let mut params = CertificateParams::new(vec![
            link::host_name(99),
            link::GATEWAY_NAME.to_owned(),
            "*.hosts.opencloud.internal".to_owned(),
        ])
        .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "gateway.opencloud.internal");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    struct Seen {
        names: Vec<String>,
        server_auth: bool,
        client_auth: bool,
        is_ca: bool,
        not_after: i64,
        issuer: String,
    }

    fn inspect(pem: &str) -> Seen {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let names = cert
            .subject_alternative_name()
            .unwrap()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(name) => Some(name.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let eku = cert.extended_key_usage().unwrap().unwrap().value.clone();
        Seen {
            names,
            server_auth: eku.server_auth,
            client_auth: eku.client_auth,
            is_ca: cert.is_ca(),
            not_after: cert.validity().not_after.timestamp(),
            issuer: cert.issuer().to_string(),
        }
    }

    #[test]
    fn a_host_certificate_names_only_its_host_and_serves_only() {
        let ca = HostCa::open(&temp_dir("host"), NOW).unwrap();
        let key = KeyPair::generate().unwrap();
        let issued = ca
            .issue(Holder::Host(7), &greedy_request(&key), NOW)
            .unwrap();
        let seen = inspect(&issued.certificate.certificate);
        assert_eq!(
            seen.names,
            [
                "h7.hosts.opencloud.internal",
                "*.h7.hosts.opencloud.internal"
            ]
        );
        assert!(seen.server_auth && !seen.client_auth, "serverAuth only");
        assert!(!seen.is_ca);
        assert!(seen.issuer.contains("OpenCloud host link CA"));
        assert_eq!(seen.not_after, (NOW + LINK_CERTIFICATE_SECONDS) as i64);
        assert_eq!(issued.certificate.ca, ca.certificate());
        let (_, der) =
            x509_parser::pem::parse_x509_pem(issued.certificate.certificate.as_bytes()).unwrap();
        assert_eq!(issued.fingerprint, CertFingerprint::of(&der.contents));
    }

    #[test]
    fn a_gateway_certificate_names_the_gateway_and_is_a_client_only() {
        let ca = HostCa::open(&temp_dir("gateway"), NOW).unwrap();
        let key = KeyPair::generate().unwrap();
        let issued = ca
            .issue(Holder::Gateway, &greedy_request(&key), NOW)
            .unwrap();
        let seen = inspect(&issued.certificate.certificate);
        assert_eq!(seen.names, ["gateway.opencloud.internal"]);
        assert!(seen.client_auth && !seen.server_auth, "clientAuth only");
    }

    #[test]
    fn requests_not_signed_by_their_key_or_not_p256_are_refused() {
        let ca = HostCa::open(&temp_dir("requests"), NOW).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = greedy_request(&key);
        // The signature's last byte changed: it still parses, but no longer
        // proves the key.
        let (_, pem) = x509_parser::pem::parse_x509_pem(csr.as_bytes()).unwrap();
        let mut der = pem.contents.clone();
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der)
        );
        for bad in [
            tampered.as_str(),
            "",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            assert!(ca.issue(Holder::Host(1), bad, NOW).is_err());
        }
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&ed25519)
            .unwrap()
            .pem()
            .unwrap();
        assert_eq!(
            ca.issue(Holder::Host(1), &csr, NOW).unwrap_err(),
            RequestError("the key must be ECDSA P-256")
        );
    }

    #[test]
    fn every_issue_is_a_new_certificate() {
        let ca = HostCa::open(&temp_dir("serials"), NOW).unwrap();
        let csr = link::certificate_request(&link::new_private_key().unwrap()).unwrap();
        let one = ca.issue(Holder::Host(3), &csr, NOW).unwrap();
        let two = ca.issue(Holder::Host(3), &csr, NOW).unwrap();
        assert_ne!(one.fingerprint, two.fingerprint);
    }

    #[test]
    fn the_ca_is_made_once_kept_private_and_reopened_as_the_same_ca() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("files");
        let made = HostCa::open(&dir, NOW).unwrap();
        let mode = |name: &str| {
            std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        let reopened = HostCa::open(&dir, NOW + 10).unwrap();
        assert_eq!(reopened.certificate(), made.certificate());
        // What the reopened CA issues chains to the certificate peers hold.
        let csr = link::certificate_request(&link::new_private_key().unwrap()).unwrap();
        let issued = reopened.issue(Holder::Host(1), &csr, NOW).unwrap();
        let (_, ca) = x509_parser::pem::parse_x509_pem(made.certificate().as_bytes()).unwrap();
        let ca = ca.parse_x509().unwrap();
        let (_, leaf) =
            x509_parser::pem::parse_x509_pem(issued.certificate.certificate.as_bytes()).unwrap();
        let leaf = leaf.parse_x509().unwrap();
        leaf.verify_signature(Some(ca.public_key())).unwrap();
        assert_eq!(leaf.issuer(), ca.subject());

        std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let err = HostCa::open(&dir, NOW).err().unwrap().to_string();
        assert!(
            err.contains("host CA key") && err.contains(KEY_FILE) && err.contains("mode 0640"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_certificate_without_its_key_or_with_another_key_is_refused() {
        let dir = temp_dir("mismatch");
        HostCa::open(&dir, NOW).unwrap();
        std::fs::remove_file(dir.join(KEY_FILE)).unwrap();
        let err = HostCa::open(&dir, NOW).err().unwrap().to_string();
        assert!(
            err.contains(CERTIFICATE_FILE) && err.contains("has no key"),
            "{err}"
        );
        opencloud_protocol::config::write_private_file(
            &dir.join(KEY_FILE),
            link::new_private_key().unwrap(),
        )
        .unwrap();
        let err = HostCa::open(&dir, NOW).err().unwrap().to_string();
        assert!(err.contains("is not the certificate of"), "{err}");
    }
}
