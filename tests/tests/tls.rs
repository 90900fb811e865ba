//! The server speaks TLS itself and devices verify its certificate (wss://), with a private CA
//! made at test time.

use std::sync::Arc;

use peersync_core::sync::{SyncError, SyncOptions};
use peersync_server::app::{AppState, Options, serve};
use peersync_tests::*;

struct Pki {
    ca_pem: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn make_pki(dir: &std::path::Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Pki { ca_pem: ca.pem(), cert: cert_path, key: key_path }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_sync_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let acceptor = peersync_server::tls::acceptor(&pki.cert, &pki.key).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let opts = Options { admin_token: Some(ADMIN_TOKEN.into()), tls: true, ..Options::default() };
    let state = Arc::new(AppState::open(&dir.path().join("server"), rx, opts).unwrap());
    seed(&state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, Some(acceptor), state.clone(), tx, async move {
        let _ = stop_rx.await;
    }));
    let url = format!("wss://localhost:{port}");
    let trusted = SyncOptions::new(url.clone()).trust_ca(pki.ca_pem.clone());

    let (a, _) = open_phone(dir.path(), "a").await;
    let (b, _) = open_phone(dir.path(), "b").await;
    // Without the CA, the certificate is not trusted: no enrollment, nothing sent.
    let err = a.enroll(&SyncOptions::new(url.clone()), &state.dir.issue_code(ORG, "w-001").unwrap().0, "a").await.unwrap_err();
    assert!(matches!(&err, SyncError::Untrusted { reason, .. } if reason.contains("TLS")), "{err:?}");
    a.enroll(&trusted, &state.dir.issue_code(ORG, "w-001").unwrap().0, "a").await.unwrap();
    b.enroll(&trusted, &state.dir.issue_code(ORG, "w-002").unwrap().0, "b").await.unwrap();
    a.register_person(person("p-1", "AB")).await.unwrap();
    a.record_visit("p-1", visit("v-1", "over TLS")).await.unwrap();
    let r = a.sync(&trusted).await.unwrap();
    assert_eq!(r.docs_sent, 1);
    b.sync(&trusted).await.unwrap();
    assert_eq!(visit_ids(&b, "p-1").await, ["v-1"]);
    // A sync without the CA fails before anything is sent.
    let err = a.sync(&SyncOptions::new(url.clone())).await.unwrap_err();
    assert!(matches!(&err, SyncError::Untrusted { .. }), "a certificate that does not verify is not a network fault: {err:?}");
    // Plain ws:// to this TLS server is a wrong URL, not a network fault.
    let err = a.sync(&SyncOptions::new(format!("ws://localhost:{port}"))).await.unwrap_err();
    assert!(matches!(&err, SyncError::BadUrl { reason, .. } if reason.contains("wss://")), "{err:?}");
    // Plain ws:// to a host off loopback is refused on the device before connecting.
    let err = a.sync(&SyncOptions::new("ws://sync.example.org:8080")).await.unwrap_err();
    assert!(matches!(&err, SyncError::BadUrl { reason, .. } if reason.contains("loopback")), "{err:?}");

    let _ = stop_tx.send(());
    let _ = task.await;
}
