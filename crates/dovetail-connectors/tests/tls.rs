//! Records go to an `https://` partner over TLS, checked against the
//! platform's trusted roots (here a test CA, through `SSL_CERT_FILE`), and
//! not to a partner whose certificate does not name it. One test in its own
//! binary, because it sets the environment.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{OK, header_values, recorder, request_lines, send, sink};
use dovetail_core::policy::Answer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

fn acceptor(name: &str) -> TlsAcceptor {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls");
    let chain = vec![CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

#[test]
fn records_go_over_tls_to_a_partner_whose_certificate_is_trusted() {
    // SAFETY: the only test in this binary, and no other thread has started:
    // nothing reads the environment while it changes.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/ca.pem"));
        for proxy in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            std::env::remove_var(proxy);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (port, seen) = recorder(Some(acceptor("partner"))).await;
        for host in ["localhost", "127.0.0.1"] {
            let (answer, detail) = send(&sink(&format!("https://{host}:{port}"))).await;
            assert_eq!(answer, OK, "{host}: {detail:?}");
        }
        assert_eq!(request_lines(&seen), ["POST /orders HTTP/1.1", "POST /orders HTTP/1.1"]);
        let hosts: Vec<Vec<String>> = seen.lock().unwrap().iter().map(|h| header_values(h, "host")).collect();
        assert_eq!(hosts, [[format!("localhost:{port}")], [format!("127.0.0.1:{port}")]]);

        // Signed by the trusted CA, but for another name: refused before anything is sent.
        let (port, seen) = recorder(Some(acceptor("other"))).await;
        let (answer, detail) = send(&sink(&format!("https://localhost:{port}"))).await;
        assert_eq!(answer, Answer::Connection, "{detail:?}");
        assert!(detail.as_deref().unwrap_or("").contains("certificate"), "{detail:?}");
        assert!(seen.lock().unwrap().is_empty());
    });
}
