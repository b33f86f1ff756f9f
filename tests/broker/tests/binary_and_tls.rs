//! The `kbs-test-broker` binary (config file, --ready-file, request log) and HTTPS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kbs_test_broker::{Broker, BrokerConfig, RequiredStatus, ResourcePolicy, TlsConfig};

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert_path, key_path, cert.cert.der().to_vec())
}

fn tls_agent(cert_der: Vec<u8>) -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(cert_der))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .build()
}

#[test]
fn binary_serves_the_config_and_writes_the_ready_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("value.bin"), b"from a file").unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        r#"
        allow_sample = true
        [resources."default/key/volume"]
        value_file = "value.bin"
        policy = { tees = ["sample"], require = "warning" }
        "#,
    )
    .unwrap();
    let ready = dir.path().join("ready");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_kbs-test-broker"))
            .args(["--config", config.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--ready-file", ready.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break text.trim().to_string();
        }
        assert!(Instant::now() < deadline, "no ready file");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let client = Client::new(&url);
    let key = TeeKey::ec();
    let (cookie, nonce) = client.auth("sample");
    let jwk = key.jwk();
    let rd = key.report_data(&nonce, &jwk);
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &jwk, sample_evidence(&rd)),
        Some(&cookie),
    );
    assert_eq!(reply.status, 200);
    let reply = client.get("/kbs/v0/resource/default/key/volume", Some(&cookie), None);
    assert_eq!(key.decrypt(&reply.json()).unwrap(), b"from a file");
    client
        .get("/kbs/v0/resource/default/key/other", Some(&cookie), None)
        .assert_error(401, "PluginInternalError");

    child.0.kill().unwrap();
    let _ = child.0.wait();
    let mut log = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("POST /kbs/v0/auth -> 200"), "{log}");
    assert!(
        log.contains("-> 401 PluginInternalError: no resource default/key/other"),
        "{log}"
    );
    // the released value never reaches the log
    assert!(!log.contains("from a file"), "{log}");
}

#[test]
fn binary_refuses_bad_arguments_and_configs() {
    let exe = env!("CARGO_BIN_EXE_kbs-test-broker");
    let out = Command::new(exe)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config is required"));
    let out = Command::new(exe)
        .args(["--config", "x", "--listen", "y", "--tls-cert", "c"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[resources.\"a/b/c\"]\nvalue = \"00\"\npolicy = { tees = [\"snp\"] }\n",
    )
    .unwrap();
    let out = Command::new(exe)
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"snp\""));
}

#[test]
fn https_with_a_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path());
    let config = BrokerConfig {
        allow_sample: true,
        tls: Some(TlsConfig { cert, key }),
        ..BrokerConfig::default()
    }
    .with_resource(
        "default/key/volume",
        b"over tls",
        ResourcePolicy::new(&["sample"], RequiredStatus::Warning),
    );
    let broker = Broker::start(config, "127.0.0.1:0").unwrap();
    assert!(broker.url().starts_with("https://127.0.0.1:"));
    let client = Client::with_agent(broker.url(), tls_agent(der));
    let tee_key = TeeKey::ec();
    let (cookie, nonce) = client.auth("sample");
    let jwk = tee_key.jwk();
    let rd = tee_key.report_data(&nonce, &jwk);
    assert_eq!(
        client
            .post(
                "/kbs/v0/attest",
                &attestation(&nonce, &jwk, sample_evidence(&rd)),
                Some(&cookie)
            )
            .status,
        200
    );
    let reply = client.get("/kbs/v0/resource/default/key/volume", Some(&cookie), None);
    assert_eq!(tee_key.decrypt(&reply.json()).unwrap(), b"over tls");

    // a client that does not trust the certificate gets no answer
    let untrusting = ureq::AgentBuilder::new().build();
    assert!(untrusting
        .post(&format!("{}/kbs/v0/auth", broker.url()))
        .send_string("{}")
        .is_err());
    broker.stop();
}

#[test]
fn stop_releases_the_port() {
    let broker = Broker::start(BrokerConfig::default(), "127.0.0.1:0").unwrap();
    let addr = broker.local_addr();
    broker.stop();
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
    // and a broker dropped without stop() stops too
    let addr = {
        let broker = Broker::start(BrokerConfig::default(), "127.0.0.1:0").unwrap();
        broker.local_addr()
    };
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
}
