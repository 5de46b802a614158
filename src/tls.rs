//! TLS between clients and a d-engine cluster, and between its nodes.
//!
//! # Guarantees
//! - A [`ClientTls`] verifies every node against its CA only (no system roots): a node whose
//!   certificate another CA signed is refused, and the error names TLS and the reason
//!   ("invalid peer certificate: UnknownIssuer").
//! - With a client identity ([`ClientTls::identity_files`]) the client presents it; a node that
//!   requires client certificates ([`NodeTls::require_client_certs`]) refuses clients without
//!   one signed by its client CA.
//! - A node serving TLS dials its peers over TLS too, trusting its CA and, with mTLS, presenting
//!   its own certificate (dcoord's patch of d-engine-server; 0.2.4 dials peers in plain text
//!   only, so a TLS cluster of several nodes never elected a leader).
//! - Certificates and keys are checked when they are loaded: a missing file, or one that holds
//!   no PEM certificate or key, is an error naming the file, before anything connects.
//!
//! # Not guaranteed
//! - No certificate reloading: a node reads its files at start, a client when it is built.
//!   Rotate by restarting (nodes one at a time keep the cluster up).
//! - A node's admin endpoint (`dcoord node --admin`, the replica view) and `--metrics-addr`
//!   are plain HTTP: bind them to a private address.
//! - [`generate_local`] makes a throwaway CA for local clusters and tests; its key is written
//!   next to the certificates. It is not a way to run production PKI.
//!
//! # Failure modes
//! - A client with the wrong CA, or in plain text against a TLS node (or the reverse), cannot
//!   find a leader: [`crate::store::RemoteStore::connect`] fails with [`Error::Unavailable`]
//!   whose message says, per endpoint, what the TLS handshake reported.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};

/// What a client needs to reach TLS nodes: the CA that signed them, and optionally a client
/// certificate for nodes that require one. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the server's certificate against, when it is not the dialled host
    /// (a node reaching itself on 127.0.0.1 verifies its advertised name).
    domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(what, path, e))
}

fn check_certs(pem: &[u8], whence: &str) -> Result<()> {
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| Error::Config(format!("{whence}: bad PEM certificate: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(Error::Config(format!(
            "{whence}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
        )));
    }
    Ok(())
}

/// d-engine refuses a node key whose mode is not exactly 0600.
fn check_key_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| Error::io("cannot read the node key", path, e))?
        .permissions()
        .mode();
    if mode & 0o777 != 0o600 {
        return Err(Error::Config(format!(
            "node key {}: mode {:o}; d-engine requires 600 (chmod 600 it)",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

fn check_key(pem: &[u8], whence: &str) -> Result<()> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(drop)
        .map_err(|e| Error::Config(format!("{whence}: no PEM private key in it ({e})")))
}

impl ClientTls {
    /// Trusts the CA certificate(s) in `ca_pem`.
    ///
    /// # Errors
    /// [`Error::Config`] when `ca_pem` holds no PEM certificate.
    pub fn from_pem(ca_pem: impl Into<Vec<u8>>) -> Result<Self> {
        let ca = ca_pem.into();
        check_certs(&ca, "CA")?;
        Ok(Self {
            ca,
            identity: None,
            domain: None,
        })
    }

    /// Trusts the CA certificate(s) in the file at `ca` (as etcdctl's `--cacert`).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file when it cannot be read; [`Error::Config`] naming it when
    /// it holds no PEM certificate.
    pub fn from_ca_file(ca: impl AsRef<Path>) -> Result<Self> {
        let path = ca.as_ref();
        let pem = read("cannot read the CA certificate", path)?;
        check_certs(&pem, &format!("CA certificate {}", path.display()))?;
        Ok(Self {
            ca: pem,
            identity: None,
            domain: None,
        })
    }

    /// Presents this client certificate and key (PEM) to nodes that require one.
    ///
    /// # Errors
    /// [`Error::Config`] when `cert` holds no certificate or `key` no private key.
    pub fn identity_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Result<Self> {
        let (cert, key) = (cert.into(), key.into());
        check_certs(&cert, "client certificate")?;
        check_key(&key, "client key")?;
        self.identity = Some((cert, key));
        Ok(self)
    }

    /// Presents the client certificate and key in these files (etcdctl's `--cert`, `--key`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Config`] naming the file that cannot be read or holds no
    /// certificate / key.
    pub fn identity_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let cert_pem = read("cannot read the client certificate", cert)?;
        let key_pem = read("cannot read the client key", key)?;
        check_certs(&cert_pem, &format!("client certificate {}", cert.display()))?;
        check_key(&key_pem, &format!("client key {}", key.display()))?;
        Ok(Self {
            identity: Some((cert_pem, key_pem)),
            ..self
        })
    }

    /// Whether a client certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// Verifies servers' certificates against `host` instead of the dialled host.
    pub(crate) fn verifying_as(mut self, host: &str) -> Self {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.domain = Some(host.to_string());
        self
    }

    /// tonic's form.
    pub(crate) fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

/// A gRPC endpoint (tonic's) for `addr` (`host:port`, or with the scheme that matches `tls`):
/// `https://` with `tls`, `http://` without. For raw gRPC calls to a node beside a store.
///
/// # Errors
/// [`Error::InvalidArgument`] when `addr` is not a valid URI authority, or names the other
/// scheme (`https://` without TLS settings, `http://` with them).
pub fn endpoint(addr: &str, tls: Option<&ClientTls>) -> Result<Endpoint> {
    let bad = |why: String| Error::InvalidArgument(format!("endpoint {addr:?}: {why}"));
    let rest = match (addr.split_once("://"), tls) {
        (Some(("https", _)), None) => {
            return Err(bad(
                "https:// needs the cluster's CA (--cacert, ClientTls)".into()
            ));
        }
        (Some(("http", _)), Some(_)) => {
            return Err(bad("http:// is plain text, but TLS is configured".into()));
        }
        (Some((_, rest)), _) => rest,
        (None, _) => addr,
    };
    let bad = |e: tonic::transport::Error| bad(e.to_string());
    match tls {
        None => Endpoint::from_shared(format!("http://{rest}")).map_err(bad),
        Some(tls) => Endpoint::from_shared(format!("https://{rest}"))
            .map_err(bad)?
            .tls_config(tls.config())
            .map_err(bad),
    }
}

/// What a node serves TLS with: its certificate and key, the CA it trusts for its peers, and
/// optionally a client CA whose certificates it requires from every client (and peer).
#[derive(Debug, Clone)]
pub struct NodeTls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca: PathBuf,
    pub(crate) client_ca: Option<PathBuf>,
}

impl NodeTls {
    /// Serves with the certificate `cert` and key `key`; peers are trusted when `ca` signed
    /// them. The paths are made absolute (d-engine reads them from its own working directory).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Config`] naming a file that cannot be read or holds no
    /// certificate / key.
    pub fn new(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Self> {
        let abs = |p: &Path| std::path::absolute(p).map_err(|e| Error::io("bad path", p, e));
        let (cert, key, ca) = (abs(cert.as_ref())?, abs(key.as_ref())?, abs(ca.as_ref())?);
        check_certs(
            &read("cannot read the node certificate", &cert)?,
            &format!("node certificate {}", cert.display()),
        )?;
        check_key(
            &read("cannot read the node key", &key)?,
            &format!("node key {}", key.display()),
        )?;
        check_key_mode(&key)?;
        ClientTls::from_ca_file(&ca)?;
        Ok(Self {
            cert,
            key,
            ca,
            client_ca: None,
        })
    }

    /// The node's certificate file.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// The node's private key file.
    pub fn key(&self) -> &Path {
        &self.key
    }

    /// The CA file the node trusts for its peers.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// The client CA, when the node requires client certificates.
    pub fn client_ca(&self) -> Option<&Path> {
        self.client_ca.as_deref()
    }

    /// Requires every client and peer to present a certificate signed by `client_ca` (mTLS).
    /// Peers present the node's own certificate, so it must be signed by `client_ca` too, and
    /// allow client authentication (no extended key usage, or one that includes `clientAuth`
    /// as well as `serverAuth`; [`generate_local`]'s do).
    ///
    /// # Errors
    /// As [`ClientTls::from_ca_file`].
    pub fn require_client_certs(mut self, client_ca: impl AsRef<Path>) -> Result<Self> {
        let path = std::path::absolute(client_ca.as_ref())
            .map_err(|e| Error::io("bad path", client_ca.as_ref(), e))?;
        ClientTls::from_ca_file(&path)?;
        self.client_ca = Some(path);
        Ok(self)
    }

    /// How the node reaches itself and its peers (its own admin probes, the leader clock):
    /// trusting its CA, presenting its own certificate when client certificates are required.
    pub(crate) fn client(&self) -> Result<ClientTls> {
        let tls = ClientTls::from_ca_file(&self.ca)?;
        match self.client_ca {
            Some(_) => tls.identity_files(&self.cert, &self.key),
            None => Ok(tls),
        }
    }

    /// The same settings as d-engine reads them from a node's config.
    pub(crate) fn from_engine(cfg: &d_engine_core::TlsConfig) -> Option<Self> {
        cfg.enable_tls.then(|| Self {
            cert: cfg.server_certificate_path.clone().into(),
            key: cfg.server_private_key_path.clone().into(),
            ca: cfg.certificate_authority_root_path.clone().into(),
            client_ca: cfg
                .enable_mtls
                .then(|| cfg.client_certificate_authority_root_path.clone().into()),
        })
    }
}

/// The files [`generate_local`] wrote.
#[derive(Debug, Clone)]
pub struct LocalPki {
    /// The CA certificate (what clients trust: `--cacert`).
    pub ca: PathBuf,
    /// A client certificate and key signed by the CA (`--cert`, `--key`).
    pub client: (PathBuf, PathBuf),
    /// One certificate and key per node, in the order of `nodes`.
    pub nodes: Vec<NodeTls>,
}

impl LocalPki {
    /// A client that trusts the CA and presents the client certificate.
    ///
    /// # Errors
    /// As [`ClientTls::identity_files`] (only if the files were changed since).
    pub fn client_tls(&self) -> Result<ClientTls> {
        ClientTls::from_ca_file(&self.ca)?.identity_files(&self.client.0, &self.client.1)
    }
}

/// Writes a throwaway CA, one certificate per node and a client certificate into `dir`, for
/// local clusters and tests. Node certificates name `localhost`, `127.0.0.1`, `::1` and each
/// of `hosts`; with `mutual`, every node requires client certificates signed by the same CA.
///
/// # Errors
/// [`Error::Io`] naming the file that cannot be written; [`Error::Config`] for a host name
/// rcgen refuses.
pub fn generate_local(dir: &Path, nodes: usize, hosts: &[&str], mutual: bool) -> Result<LocalPki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let gen_err = |e: rcgen::Error| Error::Config(format!("cannot generate a certificate: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    // Keys are readable by their owner only: d-engine refuses a key file others can read.
    let write = |name: &str, pem: String| -> Result<PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = dir.join(name);
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(pem.as_bytes()))
            .map_err(|e| Error::io("cannot write", &path, e))?;
        std::path::absolute(&path).map_err(|e| Error::io("bad path", &path, e))
    };

    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("dcoord local CA {:08x}", fastrand::u32(..)),
    );
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err)?;
    let ca = write("ca.pem", ca_cert.pem())?;
    write("ca.key", ca_key.serialize_pem())?;

    let leaf = |name: &str, sans: Vec<String>| -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(sans).map_err(gen_err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(gen_err)?;
        Ok((
            write(&format!("{name}.pem"), cert.pem())?,
            write(&format!("{name}.key"), key.serialize_pem())?,
        ))
    };
    let mut sans: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    sans.extend(hosts.iter().map(|h| h.to_string()));
    let mut node_tls = Vec::with_capacity(nodes);
    for id in 1..=nodes {
        let (cert, key) = leaf(&format!("node-{id}"), sans.clone())?;
        node_tls.push(NodeTls {
            cert,
            key,
            ca: ca.clone(),
            client_ca: mutual.then(|| ca.clone()),
        });
    }
    let client = leaf("client", vec!["dcoord-client".into()])?;
    Ok(LocalPki {
        ca,
        client,
        nodes: node_tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pki = generate_local(dir.path(), 2, &[], false).unwrap();
        assert_eq!(pki.nodes.len(), 2);
        assert!(pki.nodes.iter().all(|n| n.client_ca.is_none()));
        let node = &pki.nodes[1];
        NodeTls::new(&node.cert, &node.key, &node.ca).unwrap();
        let mode = std::fs::metadata(&node.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a key readable by others: {mode:o}");
        assert!(pki.client_tls().unwrap().has_identity());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let pki = generate_local(dir.path(), 1, &[], false).unwrap();
        let missing = dir.path().join("nope.pem");
        let err = ClientTls::from_ca_file(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        let err = NodeTls::new(&pki.nodes[0].key, &pki.nodes[0].key, &pki.ca)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node-1.key") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = ClientTls::from_ca_file(&pki.ca)
            .unwrap()
            .identity_files(&pki.client.0, &pki.client.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client.pem") && err.contains("no PEM private key"),
            "{err}"
        );
        assert!(ClientTls::from_pem(b"junk".to_vec()).is_err());
    }
}
