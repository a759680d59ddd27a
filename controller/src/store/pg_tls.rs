//! TLS to PostgreSQL, with libpq's `sslmode` meanings.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and leaves the certificate check to
//! the TLS connector; libpq's stricter modes and its CA file are read here, from the URL's
//! query (`postgres://mesh@db.example:5432/mesh?sslmode=verify-full&sslrootcert=/etc/mesh/db-ca.pem`),
//! and taken out of it before tokio-postgres parses the rest:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | when the server offers it | no (as libpq; with `sslrootcert`, as `verify-ca`) |
//! | `require` | always | no (as libpq; with `sslrootcert`, as `verify-ca`) |
//! | `verify-ca` | always | signed by `sslrootcert` |
//! | `verify-full` | always | signed by `sslrootcert` and naming the host connected to |
//!
//! Key=value connection strings pass to tokio-postgres as they are (its three modes, and no
//! certificate check).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Not at all: the connection is encrypted, not authenticated (libpq's `prefer`, `require`).
    None,
    /// Signed by the CA file.
    Ca,
    /// Signed by the CA file and valid for the host name.
    Full,
}

/// A connection string ready for tokio-postgres, and the TLS connector it goes with.
pub struct PgTarget {
    /// The connection string without the options read here.
    pub url: String,
    /// The connector (used only where `sslmode` asks for TLS).
    pub tls: MakeRustlsConnect,
}

/// Reads the TLS options of `url` and builds its connector; the error says what to fix.
pub fn target(url: &str) -> Result<PgTarget, String> {
    let (url, mode, root) = split_options(url)?;
    let check = match (mode.as_deref(), &root) {
        (Some("verify-full"), _) => Check::Full,
        (Some("verify-ca"), _) => Check::Ca,
        (_, Some(_)) => Check::Ca,
        _ => Check::None,
    };
    if check != Check::None && root.is_none() {
        return Err(format!(
            "sslmode={} needs sslrootcert=PATH in the database URL: the CA certificate (PEM) that signed the PostgreSQL server's certificate",
            mode.as_deref().unwrap_or("verify-ca")
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = match (&root, check) {
        (Some(path), check) => {
            let roots = Arc::new(load_roots(path)?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            let verifier: Arc<dyn ServerCertVerifier> = if check == Check::Full {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
        // prefer and require without a CA file: any certificate (libpq's meaning of these
        // modes: encrypted against eavesdroppers, not authenticated), the handshake's
        // signatures still checked against it.
        (None, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(mesh_control::quic::any_certificate(provider))
            .with_no_client_auth(),
    };
    Ok(PgTarget {
        url,
        tls: MakeRustlsConnect::new(config),
    })
}

/// Takes `sslmode=verify-*` (left as `require` for tokio-postgres) and `sslrootcert` out of a
/// URL's query; returns the rest, the mode given and the CA file.
fn split_options(url: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_owned(), None, None));
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                let value = decode(value)?;
                match value.as_str() {
                    "disable" | "prefer" | "require" => kept.push(pair.to_owned()),
                    "verify-ca" | "verify-full" => kept.push("sslmode=require".to_owned()),
                    other => {
                        return Err(format!(
                            "sslmode={other} is not a PostgreSQL TLS mode: use disable, prefer, require, verify-ca or verify-full"
                        ))
                    }
                }
                mode = Some(value);
            }
            "sslrootcert" => root = Some(decode(value)?),
            _ => kept.push(pair.to_owned()),
        }
    }
    if mode.as_deref() == Some("disable") && root.is_some() {
        return Err("sslrootcert with sslmode=disable: drop one of them".to_owned());
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, mode, root))
}

/// Percent-decodes one query value.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in the database URL: {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the database URL's {s:?} is not UTF-8"))
}

fn load_roots(path: &str) -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {path} holds no certificate: give the PEM file of the CA that signed the PostgreSQL server's certificate"
        ));
    }
    Ok(roots)
}

/// `verify-ca`: the chain must lead to the CA file; the name in the certificate is not checked.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_modes_are_read_and_taken_out_of_the_url() {
        let (url, mode, root) =
            split_options("postgres://m@db:5432/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5")
                .expect("valid");
        assert_eq!(
            url,
            "postgres://m@db:5432/x?sslmode=require&connect_timeout=5"
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (url, mode, root) = split_options("postgres://m@db/x").expect("valid");
        assert_eq!(
            (url.as_str(), mode, root),
            ("postgres://m@db/x", None, None)
        );
        // Key=value strings are tokio-postgres's own.
        let kv = "host=db dbname=x sslmode=require";
        assert_eq!(split_options(kv).expect("valid").0, kv);
    }

    #[test]
    fn a_mode_that_needs_a_ca_file_says_so() {
        let Err(e) = target("postgres://m@db/x?sslmode=verify-full") else {
            panic!("accepted verify-full without sslrootcert");
        };
        assert!(e.contains("needs sslrootcert=PATH"), "{e}");
        let Err(e) = target("postgres://m@db/x?sslmode=verify") else {
            panic!("accepted sslmode=verify");
        };
        assert!(e.contains("not a PostgreSQL TLS mode"), "{e}");
        let Err(e) = target("postgres://m@db/x?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
        else {
            panic!("accepted a CA file that does not exist");
        };
        assert!(
            e.contains("cannot read sslrootcert /nonexistent/ca.pem"),
            "{e}"
        );
    }

    /// A real PostgreSQL that takes TCP only over TLS (its certificate names `localhost`),
    /// reached as the controller reaches it (`Conn::postgres`). Runs with the other PostgreSQL
    /// tests (`MESH_TEST_DATABASE=postgres`, as test.sh runs them).
    #[test]
    fn the_controller_talks_to_postgresql_over_tls_as_sslmode_says() {
        use crate::store::sql::Conn;
        if std::env::var("MESH_TEST_DATABASE").as_deref() != Ok("postgres") {
            return;
        }
        let mut pg = mesh_testpg::Postgres::start_tls().unwrap_or_else(|e| panic!("{e}"));
        let db = pg.new_database();
        let name = db.rsplit('/').next().expect("a database name").to_owned();
        let port = pg.port();
        let ca = pg.ca_file().display().to_string();
        let other = pg.unrelated_ca_file().display().to_string();
        let url = |host: &str, query: &str| format!("postgres://mesh@{host}:{port}/{name}?{query}");
        let works = |url: String| {
            let conn = Conn::postgres(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
            let n: i64 = conn
                .query_row(
                    "SELECT CAST(40 + 2 AS BIGINT)",
                    crate::store::sql::params![],
                    |r| r.get(0),
                )
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(n, 42, "{url}");
        };
        let fails = |url: String| match Conn::postgres(&url) {
            Ok(_) => panic!("{url}: connected"),
            Err(e) => e.to_string(),
        };

        // The full check: signed by the CA, and the name is the host's.
        works(url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ));
        // verify-ca does not look at the name (the certificate names localhost, not 127.0.0.1).
        works(url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ));
        let e = fails(url(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ));
        assert!(e.contains("TLS") && e.contains("certificate"), "{e}");
        // A certificate that the given CA did not sign is refused.
        let e = fails(url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={other}"),
        ));
        assert!(
            e.contains("certificate") && e.contains("UnknownIssuer"),
            "{e}"
        );
        let e = fails(url(
            "localhost",
            &format!("sslmode=require&sslrootcert={other}"),
        ));
        assert!(e.contains("UnknownIssuer"), "{e}");
        // require and prefer: encrypted, as libpq, without a CA file to check against.
        works(url("127.0.0.1", "sslmode=require"));
        works(format!("postgres://mesh@127.0.0.1:{port}/{name}"));
        // The server takes no plain TCP: sslmode=disable really goes without TLS.
        let e = fails(url("127.0.0.1", "sslmode=disable"));
        assert!(e.contains("no encryption"), "{e}");
        pg.stop();
    }
}
