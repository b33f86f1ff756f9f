//! The broker's HTTP API driven by a minimal client: happy paths, every rejection the spec
//! asks for, and the fault knobs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use kbs_test_broker::{
    Broker, BrokerConfig, ErrorKind, Faults, RequiredStatus, ResourcePolicy, RunningBroker,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const VALUE: &[u8] = b"volume-key-0123456789abcdef-0001";
const SAMPLE_RES: &str = "default/key/sample";

fn sample_config() -> BrokerConfig {
    BrokerConfig {
        allow_sample: true,
        ..BrokerConfig::default()
    }
    .with_resource(
        SAMPLE_RES,
        VALUE,
        ResourcePolicy::new(&["sample"], RequiredStatus::Warning),
    )
}

fn start(config: BrokerConfig) -> (RunningBroker, Client) {
    let broker = Broker::start(config, "127.0.0.1:0").unwrap();
    let client = Client::new(broker.url());
    (broker, client)
}

/// auth + attest with sample evidence; returns (cookie, token).
fn attest_sample(client: &Client, key: &TeeKey) -> (String, String) {
    let (cookie, nonce) = client.auth("sample");
    let jwk = key.jwk();
    let rd = key.report_data(&nonce, &jwk);
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &jwk, sample_evidence(&rd)),
        Some(&cookie),
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let token = reply.json()["token"].as_str().unwrap().to_string();
    (cookie, token)
}

fn last_reason(broker: &RunningBroker) -> String {
    broker
        .requests()
        .last()
        .unwrap()
        .reason
        .clone()
        .unwrap_or_default()
}

#[test]
fn sample_happy_path_releases_the_value_through_the_cookie() {
    let (broker, client) = start(sample_config());
    let key = TeeKey::ec();

    // a fresh nonce (32 random bytes) and session per /auth
    let (cookie_a, nonce_a) = client.auth("sample");
    let (cookie_b, nonce_b) = client.auth("sample");
    assert_ne!(nonce_a, nonce_b);
    assert_ne!(cookie_a, cookie_b);
    assert_eq!(STANDARD.decode(&nonce_a).unwrap().len(), 32);
    assert!(cookie_a.starts_with("kbs-session-id="));

    let reply = client.post(
        "/kbs/v0/auth",
        r#"{"version":"0.4.0","tee":"sample","extra-params":""}"#,
        None,
    );
    assert_eq!(reply.json()["extra-params"], "");
    let set_cookie = reply.set_cookie.clone().unwrap();
    assert!(set_cookie.contains("; Expires="), "{set_cookie}");
    assert!(set_cookie.ends_with(" GMT"), "{set_cookie}");

    let (cookie, token) = attest_sample(&client, &key);
    let claims = token_claims(&token);
    assert_eq!(claims["eat_profile"], "tag:github.com,2023:veraison/ear");
    let cpu0 = &claims["submods"]["cpu0"];
    assert_eq!(cpu0["ear.status"], "warning");
    let annotated = &cpu0["ear.veraison.annotated-evidence"];
    assert_eq!(annotated["runtime_data_claims"]["tee-pubkey"], key.jwk());
    assert_eq!(annotated["sample"]["svn"], "1");
    assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap());
    assert_eq!(
        broker.requests().last().unwrap().ear_status.as_deref(),
        Some("warning")
    );

    let reply = client.get(
        &format!("/kbs/v0/resource/{SAMPLE_RES}"),
        Some(&cookie),
        None,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let jwe = reply.json();
    let fields: Vec<&String> = jwe.as_object().unwrap().keys().collect();
    assert_eq!(
        fields.len(),
        5,
        "protected, encrypted_key, iv, ciphertext, tag: {jwe}"
    );
    assert_eq!(key.decrypt(&jwe).unwrap(), VALUE);

    // the token verifies with the broker's published key
    let jwk = broker.token_public_jwk();
    let point = [
        &[0x04][..],
        &URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap(),
        &URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap(),
    ]
    .concat();
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    assert!(kbs_test_broker::token::verify_token(&vk, &token, 0).is_ok());

    // a second /attest on an attested session answers the same token (as Trustee does)
    let (_, nonce) = ("", "unused");
    let again = client.post(
        "/kbs/v0/attest",
        &attestation(nonce, &key.jwk(), json!({})),
        Some(&cookie),
    );
    assert_eq!(again.json()["token"], token);

    let log = broker.requests();
    assert!(log.iter().all(|r| r.status == 200), "{log:?}");
    assert!(log.iter().all(|r| r.error.is_none()));
}

#[test]
fn rsa_oaep_key_gets_an_rsa_oaep_256_answer() {
    let (_broker, client) = start(sample_config());
    let key = TeeKey::rsa();
    let (cookie, _) = attest_sample(&client, &key);
    let reply = client.get(
        &format!("/kbs/v0/resource/{SAMPLE_RES}"),
        Some(&cookie),
        None,
    );
    assert_eq!(reply.status, 200);
    assert_eq!(key.decrypt(&reply.json()).unwrap(), VALUE);
}

#[test]
fn auth_rejects_wrong_version_missing_extra_params_and_unknown_tee() {
    let (broker, client) = start(sample_config());
    for (body, why) in [
        (
            r#"{"version":"0.3.0","tee":"sample","extra-params":""}"#,
            "Version Mismatch",
        ),
        (
            r#"{"version":"0.4","tee":"sample","extra-params":""}"#,
            "Version Mismatch",
        ),
        (
            r#"{"version":"0.4.0-rc1","tee":"sample","extra-params":""}"#,
            "Version Mismatch",
        ),
        (r#"{"version":"0.4.0","tee":"sample"}"#, "extra-params"),
        (
            r#"{"version":"0.4.0","tee":"nonsense","extra-params":""}"#,
            "unknown tee",
        ),
        (r#"{"version":"0.4.0","extra-params":""}"#, "tee"),
        ("not json", "deserialize"),
    ] {
        let reply = client.post("/kbs/v0/auth", body, None);
        reply.assert_error(401, "AttestationError");
        assert!(reply.set_cookie.is_none(), "{body}");
        let detail = reply.json()["detail"].as_str().unwrap().to_string();
        assert!(
            detail.starts_with("Attestation error: RCAR handshake Auth failed"),
            "{detail}"
        );
        assert!(
            last_reason(&broker).contains(why),
            "{body}: {}",
            last_reason(&broker)
        );
    }
    // every known tee name is accepted at /auth, including ones the broker cannot verify
    for tee in ["snp", "tdx", "az-snp-vtpm", "az-tdx-vtpm", "tpm", "sample"] {
        client.auth(tee);
    }
}

#[test]
fn attest_rejects_what_the_spec_says() {
    let (broker, client) = start(sample_config());
    let key = TeeKey::ec();
    let jwk = key.jwk();

    // no cookie; unknown cookie
    let (_, nonce) = client.auth("sample");
    let rd = key.report_data(&nonce, &jwk);
    let good = attestation(&nonce, &jwk, sample_evidence(&rd));
    let reply = client.post("/kbs/v0/attest", &good, None);
    reply.assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("cookie not found"));
    let reply = client.post("/kbs/v0/attest", &good, Some("kbs-session-id=deadbeef"));
    reply.assert_error(401, "AttestationError");

    // wrong nonce: the evidence is bound to the other session's nonce
    let (cookie, nonce) = client.auth("sample");
    let (_, other_nonce) = client.auth("sample");
    let rd = key.report_data(&other_nonce, &jwk);
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&other_nonce, &jwk, sample_evidence(&rd)),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("nonce"));

    // an extra JWK field: the client hashed it, the broker rebuilds the key without it
    let mut with_kid = jwk.clone();
    with_kid["kid"] = json!("k1");
    let rd = key.report_data(&nonce, &with_kid);
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &with_kid, sample_evidence(&rd)),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");
    assert!(
        last_reason(&broker).contains("report_data"),
        "{}",
        last_reason(&broker)
    );

    // report_data that is not the hash
    let mut rd = key.report_data(&nonce, &jwk);
    rd[47] ^= 1;
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &jwk, sample_evidence(&rd)),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("report_data"));

    // 64 bytes (48 + 16 zero) is not the 48-byte sample report_data
    let rd = key.report_data(&nonce, &jwk);
    let padded = [&rd[..], &[0u8; 16]].concat();
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &jwk, sample_evidence(&padded)),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");

    // additional evidence that is not a device evidence list is refused
    let body = json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": sample_evidence(&rd), "additional_evidence": "{\"nvidia\":{}}"},
    });
    let reply = client.post("/kbs/v0/attest", &body.to_string(), Some(&cookie));
    reply.assert_error(401, "AttestationError");

    // after all that the session still attests with the right evidence
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &jwk, sample_evidence(&rd)),
        Some(&cookie),
    );
    assert_eq!(reply.status, 200);

    // a tee the broker does not verify
    let (cookie, nonce) = client.auth("snp");
    let rd = key.report_data(&nonce, &jwk);
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(
            &nonce,
            &jwk,
            json!({"attestation_report": {}, "cert_chain": null}),
        ),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("not verified by the test broker"));
    let _ = rd;
}

#[test]
fn sample_evidence_is_refused_unless_allowed() {
    let config = BrokerConfig {
        allow_sample: false,
        ..sample_config()
    };
    let (broker, client) = start(config);
    let key = TeeKey::ec();
    let (cookie, nonce) = client.auth("sample");
    let jwk = key.jwk();
    let rd = key.report_data(&nonce, &jwk);
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &jwk, sample_evidence(&rd)),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("allow_sample"));
}

#[test]
fn sessions_expire() {
    // expired at once: /attest refuses
    let config = BrokerConfig {
        faults: Faults {
            expire_sessions_immediately: true,
            ..Faults::default()
        },
        ..sample_config()
    };
    let (broker, client) = start(config);
    let key = TeeKey::ec();
    let (cookie, nonce) = client.auth("sample");
    let jwk = key.jwk();
    let rd = key.report_data(&nonce, &jwk);
    let reply = client.post(
        "/kbs/v0/attest",
        &attestation(&nonce, &jwk, sample_evidence(&rd)),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("expired"));

    // a 1 s session: the cookie stops working, the (longer-lived) token still does
    let config = BrokerConfig {
        session_ttl_secs: 1,
        ..sample_config()
    };
    let (broker, client) = start(config);
    let (cookie, token) = attest_sample(&client, &key);
    std::thread::sleep(Duration::from_millis(2100));
    let reply = client.get(
        &format!("/kbs/v0/resource/{SAMPLE_RES}"),
        Some(&cookie),
        None,
    );
    reply.assert_error(401, "TokenNotFound");
    assert!(last_reason(&broker).contains("expired"));
    let reply = client.get(
        &format!("/kbs/v0/resource/{SAMPLE_RES}"),
        Some(&cookie),
        Some(&token),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(key.decrypt(&reply.json()).unwrap(), VALUE);
}

#[test]
fn resource_policy_denials_are_401_policy_deny() {
    let config = sample_config()
        .with_resource(
            "default/key/tpm-only",
            VALUE,
            ResourcePolicy::new(&["tpm"], RequiredStatus::Warning),
        )
        .with_resource(
            "default/key/affirming",
            VALUE,
            ResourcePolicy::new(&["sample"], RequiredStatus::Affirming),
        );
    let (broker, client) = start(config);
    let key = TeeKey::ec();
    let (cookie, _) = attest_sample(&client, &key);
    // A resource the broker does not hold: the policy (which reads the token, not the path)
    // allowed, the read failed, as in Trustee.
    let reply = client.get("/kbs/v0/resource/default/key/unknown", Some(&cookie), None);
    reply.assert_error(401, "PluginInternalError");
    assert_eq!(reply.json()["detail"], "Plugin internal error");
    assert!(last_reason(&broker).contains("no resource default/key/unknown"));
    for (path, why) in [
        ("default/key/tpm-only", "tee sample is not allowed"),
        ("default/key/affirming", "ear.status is warning"),
    ] {
        let reply = client.get(&format!("/kbs/v0/resource/{path}"), Some(&cookie), None);
        reply.assert_error(401, "PolicyDeny");
        assert_eq!(reply.json()["detail"], "Access denied by policy");
        assert!(
            last_reason(&broker).contains(why),
            "{path}: {}",
            last_reason(&broker)
        );
    }
}

#[test]
fn bad_paths_are_404() {
    let (broker, client) = start(sample_config());
    let key = TeeKey::ec();
    let (cookie, _) = attest_sample(&client, &key);
    for path in [
        "/kbs/v0/resource/default/key",
        "/kbs/v0/resource/default/key/a/b",
        "/kbs/v0/resource/.hidden/key/a",
        "/kbs/v0/resource/default/.key/a",
        "/kbs/v0/resource/default/key/.a",
        "/kbs/v0/resource/default/key/a%2Fb",
        "/kbs/v0/resource/default//a",
    ] {
        // with or without credentials
        client
            .get(path, Some(&cookie), None)
            .assert_error(404, "InvalidRequestPath");
        client
            .get(path, None, None)
            .assert_error(404, "InvalidRequestPath");
    }
    client
        .get("/kbs/v0/nothing/here", None, None)
        .assert_error(404, "PluginNotFound");
    client
        .get("/kbs/v0/auth", None, None)
        .assert_error(404, "PluginNotFound");
    // POST on a resource is Trustee's admin "set resource": refused without an admin token
    // (an attested session is no admin credential), as with the admin API off.
    client
        .post("/kbs/v0/resource/default/key/sample", "", Some(&cookie))
        .assert_error(401, "AdminAuthAccess");
    assert_eq!(
        broker.requests().last().unwrap().error,
        Some(ErrorKind::AdminAuthAccess)
    );
    client
        .post("/kbs/v0/nothing/here", "", None)
        .assert_error(404, "PluginNotFound");
    // dots inside a segment are fine (and then the storage has no such resource)
    client
        .get("/kbs/v0/resource/a.b/c./d..", Some(&cookie), None)
        .assert_error(401, "PluginInternalError");
}

#[test]
fn bearer_token_path() {
    let (broker, client) = start(sample_config());
    let key = TeeKey::ec();
    let (_, token) = attest_sample(&client, &key);
    let path = format!("/kbs/v0/resource/{SAMPLE_RES}");

    let reply = client.get(&path, None, Some(&token));
    assert_eq!(reply.status, 200);
    assert_eq!(key.decrypt(&reply.json()).unwrap(), VALUE);
    let rec = broker.requests().last().unwrap().clone();
    assert!(rec.bearer && !rec.session_cookie);

    client
        .get(&path, None, None)
        .assert_error(401, "TokenNotFound");
    client
        .get(&path, Some("kbs-session-id=unknown"), None)
        .assert_error(401, "TokenNotFound");

    // a changed claim or signature is refused
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims = token_claims(&token);
    claims["submods"]["cpu0"]["ear.status"] = json!("affirming");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    client
        .get(&path, None, Some(&forged))
        .assert_error(401, "TokenVerifierError");
    client
        .get(&path, None, Some("not-a-jwt"))
        .assert_error(401, "TokenVerifierError");

    // another broker's token is not this broker's
    let (_other, other_client) = start(sample_config());
    let (_, other_token) = attest_sample(&other_client, &key);
    client
        .get(&path, None, Some(&other_token))
        .assert_error(401, "TokenVerifierError");

    // an expired token
    let config = BrokerConfig {
        faults: Faults {
            expire_tokens_immediately: true,
            ..Faults::default()
        },
        ..sample_config()
    };
    let (expiring, expiring_client) = start(config);
    let (cookie, token) = attest_sample(&expiring_client, &key);
    expiring_client
        .get(&path, None, Some(&token))
        .assert_error(401, "TokenVerifierError");
    expiring_client
        .get(&path, Some(&cookie), None)
        .assert_error(401, "TokenVerifierError");
    assert!(last_reason(&expiring).contains("expired"));
}

#[test]
fn tampered_jwe_does_not_open() {
    let config = BrokerConfig {
        faults: Faults {
            tamper_jwe: true,
            ..Faults::default()
        },
        ..sample_config()
    };
    let (_broker, client) = start(config);
    let key = TeeKey::ec();
    let (cookie, _) = attest_sample(&client, &key);
    let reply = client.get(
        &format!("/kbs/v0/resource/{SAMPLE_RES}"),
        Some(&cookie),
        None,
    );
    assert_eq!(reply.status, 200);
    assert_eq!(
        key.decrypt(&reply.json()).unwrap_err(),
        "AES-GCM open failed"
    );
}

#[test]
fn first_n_requests_fail_with_503() {
    let config = BrokerConfig {
        faults: Faults {
            fail_first_n: 2,
            ..Faults::default()
        },
        ..sample_config()
    };
    let (broker, client) = start(config);
    let body = r#"{"version":"0.4.0","tee":"sample","extra-params":""}"#;
    assert_eq!(client.post("/kbs/v0/auth", body, None).status, 503);
    assert_eq!(client.post("/kbs/v0/auth", body, None).status, 503);
    assert_eq!(client.post("/kbs/v0/auth", body, None).status, 200);
    let statuses: Vec<u16> = broker.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
}

fn pcrs() -> [[u8; 32]; 24] {
    std::array::from_fn(|i| [i as u8 + 1; 32])
}

fn attest_tpm(
    client: &Client,
    key: &TeeKey,
    ak: &rsa::RsaPrivateKey,
    pcrs: &[[u8; 32]; 24],
    cut: usize,
    init_data: Option<&str>,
) -> common::Reply {
    let (cookie, nonce) = client.auth("tpm");
    let jwk = key.jwk();
    let rd = key.report_data(&nonce, &jwk);
    let evidence = tpm_evidence(ak, &rd[..cut], pcrs);
    let mut body: Value = serde_json::from_str(&attestation(&nonce, &jwk, evidence)).unwrap();
    if let Some(text) = init_data {
        body["init-data"] = json!({"format": "toml", "body": text});
    }
    let mut reply = client.post("/kbs/v0/attest", &body.to_string(), Some(&cookie));
    reply.set_cookie = Some(cookie);
    reply
}

#[test]
fn tpm_evidence_end_to_end() {
    let trusted = test_rsa_key();
    let untrusted = other_rsa_key();
    let pcr15 = hex::encode([16u8; 32]);
    let config = BrokerConfig {
        trusted_aks: vec![ak_public(trusted)],
        ..BrokerConfig::default()
    }
    .with_resource(
        "default/key/tpm",
        VALUE,
        ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming).with_pcr(15, &pcr15),
    )
    .with_resource(
        "default/key/wrong-pcr",
        VALUE,
        ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming).with_pcr(11, &pcr15),
    )
    .with_resource(
        "default/key/warning",
        VALUE,
        ResourcePolicy::new(&["tpm"], RequiredStatus::Warning),
    );
    let (broker, client) = start(config);
    let key = TeeKey::ec();

    // trusted AK: affirming, PCR policy passes
    let reply = attest_tpm(&client, &key, trusted, &pcrs(), 32, None);
    assert_eq!(reply.status, 200, "{}", last_reason(&broker));
    let token = reply.json()["token"].as_str().unwrap().to_string();
    let cookie = reply.set_cookie.clone().unwrap();
    let claims = token_claims(&token);
    assert_eq!(claims["submods"]["cpu0"]["ear.status"], "affirming");
    let vector = &claims["submods"]["cpu0"]["ear.trustworthiness-vector"];
    assert_eq!(
        (
            &vector["executables"],
            &vector["instance-identity"],
            &vector["hardware"]
        ),
        (&json!(3), &json!(2), &json!(2))
    );
    let tpm = &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["tpm"];
    assert_eq!(tpm["pcr15"], pcr15);
    assert_eq!(tpm["pcr00"], hex::encode([1u8; 32]));
    assert_eq!(tpm["ak_public"], ak_public(trusted));
    let ok = client.get("/kbs/v0/resource/default/key/tpm", Some(&cookie), None);
    assert_eq!(ok.status, 200);
    assert_eq!(key.decrypt(&ok.json()).unwrap(), VALUE);
    client
        .get(
            "/kbs/v0/resource/default/key/wrong-pcr",
            Some(&cookie),
            None,
        )
        .assert_error(401, "PolicyDeny");
    assert!(last_reason(&broker).contains("PCR 11"));

    // untrusted AK: still a token, status warning; the policy decides
    let reply = attest_tpm(&client, &key, untrusted, &pcrs(), 32, None);
    assert_eq!(reply.status, 200);
    let cookie = reply.set_cookie.clone().unwrap();
    assert_eq!(
        broker.requests().last().unwrap().ear_status.as_deref(),
        Some("warning")
    );
    let claims = token_claims(reply.json()["token"].as_str().unwrap());
    let vector = &claims["submods"]["cpu0"]["ear.trustworthiness-vector"];
    assert_eq!(
        (&vector["executables"], &vector["instance-identity"]),
        (&json!(33), &json!(0))
    );
    client
        .get("/kbs/v0/resource/default/key/tpm", Some(&cookie), None)
        .assert_error(401, "PolicyDeny");
    let ok = client.get("/kbs/v0/resource/default/key/warning", Some(&cookie), None);
    assert_eq!(ok.status, 200);

    // the full 48 bytes as qualifying data are rejected (must be cut to 32)
    attest_tpm(&client, &key, trusted, &pcrs(), 48, None).assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("qualifying data"));

    // init-data: PCR 8 must be SHA-256(0^32 || SHA-256(body))
    let body = "algorithm = \"sha256\"\nversion = \"0.1.0\"\n[data]\n\"policy.rego\" = \"x\"\n";
    let digest = Sha256::digest(body.as_bytes());
    let mut with_init = pcrs();
    with_init[8] = Sha256::digest([&[0u8; 32][..], &digest[..]].concat()).into();
    let reply = attest_tpm(&client, &key, trusted, &with_init, 32, Some(body));
    assert_eq!(reply.status, 200, "{}", last_reason(&broker));
    let claims = token_claims(reply.json()["token"].as_str().unwrap());
    assert_eq!(
        claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["init_data"],
        hex::encode(digest)
    );
    attest_tpm(&client, &key, trusted, &pcrs(), 32, Some(body))
        .assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("PCR 8"));

    // a signature by another key than ak_public
    let (cookie, nonce) = client.auth("tpm");
    let jwk = key.jwk();
    let rd = key.report_data(&nonce, &jwk);
    let mut evidence = tpm_evidence(untrusted, &rd[..32], &pcrs());
    evidence["ak_public"] = json!(ak_public(trusted));
    client
        .post(
            "/kbs/v0/attest",
            &attestation(&nonce, &jwk, evidence),
            Some(&cookie),
        )
        .assert_error(401, "AttestationError");
    assert!(last_reason(&broker).contains("does not verify"));
}

/// The attestation policy compares the registered `tpm_pcrNN` reference values: a PCR that
/// does not match gives `executables` 33 (status `warning`) with `instance-identity` 2 (the
/// AK is trusted), an untrusted AK gives 33 with 0; a resource that requires `affirming` is
/// refused in both cases.
#[test]
fn tpm_reference_values_set_the_trust_vector() {
    let trusted = test_rsa_key();
    let untrusted = other_rsa_key();
    let vector_of = |reply: &common::Reply| {
        let claims = token_claims(reply.json()["token"].as_str().unwrap());
        let cpu0 = &claims["submods"]["cpu0"];
        (
            cpu0["ear.status"].as_str().unwrap().to_string(),
            cpu0["ear.trustworthiness-vector"]["executables"]
                .as_i64()
                .unwrap(),
            cpu0["ear.trustworthiness-vector"]["instance-identity"]
                .as_i64()
                .unwrap(),
        )
    };
    let config = |pcr15: &str| {
        BrokerConfig {
            trusted_aks: vec![ak_public(trusted)],
            ..BrokerConfig::default()
        }
        .with_reference_value("tpm_pcr15", &["00".repeat(32).as_str(), pcr15])
        .with_resource(
            "default/key/tpm",
            VALUE,
            ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming),
        )
    };
    let key = TeeKey::ec();

    let (broker, client) = start(config(&hex::encode([16u8; 32])));
    let reply = attest_tpm(&client, &key, trusted, &pcrs(), 32, None);
    assert_eq!(reply.status, 200, "{}", last_reason(&broker));
    assert_eq!(vector_of(&reply), ("affirming".to_string(), 3, 2));
    let cookie = reply.set_cookie.clone().unwrap();
    assert_eq!(
        client
            .get("/kbs/v0/resource/default/key/tpm", Some(&cookie), None)
            .status,
        200
    );
    let reply = attest_tpm(&client, &key, untrusted, &pcrs(), 32, None);
    assert_eq!(vector_of(&reply), ("warning".to_string(), 33, 0));
    let cookie = reply.set_cookie.clone().unwrap();
    client
        .get("/kbs/v0/resource/default/key/tpm", Some(&cookie), None)
        .assert_error(401, "PolicyDeny");

    let (broker, client) = start(config(&hex::encode([17u8; 32])));
    let reply = attest_tpm(&client, &key, trusted, &pcrs(), 32, None);
    assert_eq!(reply.status, 200, "{}", last_reason(&broker));
    assert_eq!(vector_of(&reply), ("warning".to_string(), 33, 2));
    let cookie = reply.set_cookie.clone().unwrap();
    client
        .get("/kbs/v0/resource/default/key/tpm", Some(&cookie), None)
        .assert_error(401, "PolicyDeny");
    assert!(last_reason(&broker).contains("ear.status is warning"));

    // Names and values are checked.
    let bad = BrokerConfig::default()
        .with_reference_value("tpm_pcr24", &[&"00".repeat(32)])
        .with_reference_value("launch_digest", &[&"00".repeat(32)])
        .with_reference_value("tpm_pcr11", &["abc"]);
    let err = Broker::start(bad, "127.0.0.1:0").unwrap_err().to_string();
    assert!(err.contains("\"tpm_pcr24\" is not one"), "{err}");
    assert!(err.contains("\"launch_digest\" is not one"), "{err}");
    assert!(err.contains("tpm_pcr11 entry \"abc\""), "{err}");
}
