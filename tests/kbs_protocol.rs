//! cvm-warden's Trustee KBS 0.4.0 client against the faithful test broker
//! (`tests/broker`, crate `kbs_test_broker`), over real HTTP(S) on loopback.
//!
//! The broker shares no code with the client: it has its own binding string, its own
//! evidence verifiers (sample and TPM quote), its own token signer and JWE encryptor. A
//! test passing here means both independent sides agree on the wire format.
//!
//! The TPM test starts its own `swtpm` (killed on drop). When `swtpm` is not installed it
//! FAILS, naming it: it is never skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cvm_warden::digest::Digest;
use cvm_warden::kbs::{
    Attempt, Backoff, Call, Client, KbsConfig, KbsError, KeyWrap, Outcome, RecordingObserver,
    TeeKey, MAX_HANDSHAKES, MAX_NONCE, MAX_RESOURCE_REQUESTS,
};
use cvm_warden::keybroker::RealBroker;
use cvm_warden::policy::ResourceUri;
use cvm_warden::stage::KeyBroker;
use cvm_warden::tee::sample::SampleProvider;
use cvm_warden::tee::tpm::{AkSource, TpmProvider};
use cvm_warden::tee::Provider;
use kbs_test_broker::{
    Broker, BrokerConfig, ErrorKind, Faults, RequestRecord, RequiredStatus, ResourcePolicy,
    RunningBroker, TlsConfig,
};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// The resource every test asks for.
const RESOURCE: &str = "default/secrets/x";
/// Its value on the broker (32 bytes, not a valid UTF-8 string on purpose).
const SECRET: [u8; 32] = [
    0x9f, 0x00, 0x41, 0xfe, 0x13, 0x37, 0xc0, 0xde, 0x01, 0x02, 0x03, 0x04, 0xaa, 0x55, 0xff, 0x80,
    0x7f, 0x00, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xab, 0xcd, 0xef, 0x10,
];

fn uri() -> ResourceUri {
    ResourceUri::parse(&format!("kbs:///{RESOURCE}")).unwrap()
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/kbs/testdata")
        .join(name)
}

/// A broker that verifies sample evidence and releases [`SECRET`] at [`RESOURCE`] under
/// `policy`, with `faults`.
fn sample_broker(policy: ResourcePolicy, faults: Faults) -> RunningBroker {
    let config = BrokerConfig {
        allow_sample: true,
        faults,
        ..BrokerConfig::default()
    }
    .with_resource(RESOURCE, &SECRET, policy);
    Broker::start(config, "127.0.0.1:0").unwrap()
}

fn sample_policy() -> ResourcePolicy {
    ResourcePolicy::new(&["sample"], RequiredStatus::Warning)
}

/// Client config for a plain-http loopback broker, with short backoff so retry tests are
/// quick.
fn http_config(broker: &RunningBroker) -> KbsConfig {
    let mut config = KbsConfig::new(broker.url());
    config.insecure_http = true;
    config.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(40),
    };
    config.total_timeout = Duration::from_secs(30);
    config
}

fn http_client(broker: &RunningBroker) -> Client {
    Client::new(http_config(broker)).unwrap()
}

/// `(call, try, outcome, will_retry)` of every try, for compact exact assertions.
fn tries(observer: &RecordingObserver) -> Vec<(Call, u32, Outcome, bool)> {
    observer
        .attempts
        .iter()
        .map(|a: &Attempt| (a.call, a.try_no, a.outcome.clone(), a.will_retry))
        .collect()
}

/// `(method, path, status, error)` of every request the broker answered.
fn requests(broker: &RunningBroker) -> Vec<(String, String, u16, Option<ErrorKind>)> {
    broker
        .requests()
        .into_iter()
        .map(|r: RequestRecord| (r.method, r.path, r.status, r.error))
        .collect()
}

fn req(
    method: &str,
    path: &str,
    status: u16,
    error: Option<ErrorKind>,
) -> (String, String, u16, Option<ErrorKind>) {
    (method.to_string(), path.to_string(), status, error)
}

const AUTH: &str = "/kbs/v0/auth";
const ATTEST: &str = "/kbs/v0/attest";

fn resource_path() -> String {
    format!("/kbs/v0/resource/{RESOURCE}")
}

fn ok(call: Call, try_no: u32) -> (Call, u32, Outcome, bool) {
    (call, try_no, Outcome::Status(200), false)
}

/// The RSA key of the JWE vectors (2048 bits): RSA-3072 generation takes tens of seconds
/// in an unoptimised build. The client's own unit tests cover generation.
fn premade_keys(wrap: KeyWrap) -> Result<TeeKey, KbsError> {
    use rsa::pkcs8::DecodePrivateKey;
    match wrap {
        KeyWrap::RsaOaep256 => {
            let vectors: Value =
                serde_json::from_str(include_str!("../src/kbs/testdata/jwe_vectors.json")).unwrap();
            let pem = vectors["rsa"]["pkcs8_pem"].as_str().unwrap();
            Ok(TeeKey::from_rsa(
                rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap(),
            ))
        }
        KeyWrap::EcdhEsA256kw => TeeKey::generate(wrap),
    }
}

/// The verdict the broker signed, as the client decoded it.
fn annotated(claims: &Value) -> &Value {
    &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
}

// ---------------------------------------------------------------------------------------
// 1. sample evidence, EC key
// ---------------------------------------------------------------------------------------

#[test]
fn sample_ec_attest_then_release() {
    let broker = sample_broker(sample_policy(), Faults::default());
    let mut client = http_client(&broker);
    let mut provider = SampleProvider::new();
    let mut observer = RecordingObserver::default();

    let attested = client.attest(&mut provider, &mut observer).unwrap();
    assert_eq!(attested.status.as_deref(), Some("warning"));
    assert_eq!(attested.tee, "sample");
    assert!(attested.insecure);
    assert_eq!(attested.broker, broker.url());
    assert_eq!(attested.tee_pubkey["kty"], "EC");
    assert_eq!(attested.tee_pubkey["crv"], "P-256");
    assert_eq!(attested.tee_pubkey["alg"], "ECDH-ES+A256KW");
    // The broker computed the same binding from what it received, independently.
    let seen = annotated(&attested.claims);
    assert_eq!(seen["report_data"], json!(attested.report_data));
    assert_eq!(
        seen["runtime_data_claims"]["tee-pubkey"],
        attested.tee_pubkey
    );
    assert_eq!(seen["runtime_data_claims"]["nonce"], json!(attested.nonce));
    assert_eq!(
        attested.evidence,
        json!({
            "svn": "1",
            "report_data": STANDARD.encode(hex::decode(&attested.report_data).unwrap()),
        })
    );

    let released = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    assert_eq!(released.uri(), "kbs:///default/secrets/x");
    assert_eq!(released.sha256_hex(), hex::encode(Sha256::digest(SECRET)));
    // Debug never shows the bytes.
    let debug = format!("{released:?}");
    assert!(
        !debug.contains(&format!("{:?}", SECRET[..4].to_vec())),
        "{debug}"
    );
    assert!(!debug.contains(&hex::encode(SECRET)), "{debug}");

    assert_eq!(
        tries(&observer),
        [
            ok(Call::Auth, 1),
            ok(Call::Attest, 1),
            ok(Call::Resource, 1)
        ]
    );
    let resources: Vec<Option<&str>> = observer
        .attempts
        .iter()
        .map(|a| a.resource.as_deref())
        .collect();
    assert_eq!(resources, [None, None, Some("kbs:///default/secrets/x")]);

    let log = broker.requests();
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 200, None),
            req("GET", &resource_path(), 200, None),
        ]
    );
    // The session cookie from /auth was carried by /attest and by the resource request.
    assert!(!log[0].session_cookie);
    assert!(log[1].session_cookie);
    assert!(log[2].session_cookie);
    assert!(log[2].bearer);
    assert_eq!(log[1].ear_status.as_deref(), Some("warning"));
}

// ---------------------------------------------------------------------------------------
// 2. RSA-OAEP-256
// ---------------------------------------------------------------------------------------

#[test]
fn rsa_oaep_256_key_wrap_releases_the_resource() {
    let broker = sample_broker(sample_policy(), Faults::default());
    let mut config = http_config(&broker);
    config.key_wrap = KeyWrap::RsaOaep256;
    let mut client = Client::new(config)
        .unwrap()
        .with_key_generator(premade_keys);
    let mut provider = SampleProvider::new();
    let mut observer = RecordingObserver::default();

    // No explicit attest: resource() runs the handshake itself.
    let released = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);

    let attested = client.attested().unwrap();
    assert_eq!(
        attested.tee_pubkey,
        premade_keys(KeyWrap::RsaOaep256).unwrap().jwk()
    );
    let mut fields: Vec<&String> = attested.tee_pubkey.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(fields, ["alg", "e", "kty", "n"]);
    assert_eq!(attested.tee_pubkey["alg"], "RSA-OAEP-256");
    assert_eq!(
        annotated(&attested.claims)["runtime_data_claims"]["tee-pubkey"],
        attested.tee_pubkey
    );
    assert_eq!(
        tries(&observer),
        [
            ok(Call::Auth, 1),
            ok(Call::Attest, 1),
            ok(Call::Resource, 1)
        ]
    );
    // The handshake tries belong to the resource request that triggered them.
    assert!(observer
        .attempts
        .iter()
        .all(|a| a.resource.as_deref() == Some("kbs:///default/secrets/x")));
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 200, None),
            req("GET", &resource_path(), 200, None),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// 3. PolicyDeny
// ---------------------------------------------------------------------------------------

#[test]
fn policy_deny_names_the_resource_and_releases_nothing() {
    let broker = sample_broker(
        ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming),
        Faults::default(),
    );
    let mut client = http_client(&broker);
    let mut observer = RecordingObserver::default();
    let err = client
        .resource(&uri(), &mut SampleProvider::new(), &mut observer)
        .unwrap_err();
    match &err {
        KbsError::PolicyDeny { uri, detail, .. } => {
            assert_eq!(uri, "kbs:///default/secrets/x");
            assert_eq!(detail, "Access denied by policy");
        }
        other => panic!("expected PolicyDeny, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("kbs:///default/secrets/x"), "{message}");
    assert!(message.contains("refused the evidence"), "{message}");
    assert!(message.contains("PolicyDeny"), "{message}");
    // The token the client holds says why (sample evidence: no launch digest).
    assert!(
        message.contains("the broker's token (unverified token claims) says cpu0: ear.status = warning, trust vector executables=33 (unrecognized run-time: a reference value did not match), instance-identity=0 (no claim), hardware=2 (genuine), configuration=36 (configuration elements unavailable)"),
        "{message}"
    );
    // PolicyDeny is final: one handshake, one resource request, no retry.
    assert_eq!(
        tries(&observer),
        [
            ok(Call::Auth, 1),
            ok(Call::Attest, 1),
            (Call::Resource, 1, Outcome::Status(401), false)
        ]
    );
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 200, None),
            req("GET", &resource_path(), 401, Some(ErrorKind::PolicyDeny)),
        ]
    );
    let reason = broker.requests()[2].reason.clone().unwrap();
    assert!(reason.contains("tee sample is not allowed"), "{reason}");
}

// ---------------------------------------------------------------------------------------
// 4. tampered JWE
// ---------------------------------------------------------------------------------------

#[test]
fn tampered_jwe_fails_authentication_and_releases_nothing() {
    let broker = sample_broker(
        sample_policy(),
        Faults {
            tamper_jwe: true,
            ..Faults::default()
        },
    );
    let mut client = http_client(&broker);
    let mut observer = RecordingObserver::default();
    let err = client
        .resource(&uri(), &mut SampleProvider::new(), &mut observer)
        .unwrap_err();
    match &err {
        KbsError::Decrypt { uri, url, source } => {
            assert_eq!(uri, "kbs:///default/secrets/x");
            assert_eq!(url, broker.url());
            assert!(
                matches!(source, cvm_warden::kbs::JweError::Authentication),
                "{source:?}"
            );
        }
        other => panic!("expected Decrypt, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("cannot decrypt kbs:///default/secrets/x"),
        "{message}"
    );
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        source.contains("AES-256-GCM authentication failed"),
        "{source}"
    );
    // The broker did answer 200: the failure is the client's integrity check.
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 200, None),
            req("GET", &resource_path(), 200, None),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// 5. expired sessions and tokens
// ---------------------------------------------------------------------------------------

#[test]
fn expired_session_surfaces_the_attestation_error() {
    let broker = sample_broker(
        sample_policy(),
        Faults {
            expire_sessions_immediately: true,
            ..Faults::default()
        },
    );
    let mut client = http_client(&broker);
    let mut observer = RecordingObserver::default();
    let err = client
        .attest(&mut SampleProvider::new(), &mut observer)
        .unwrap_err();
    match &err {
        KbsError::EvidenceRejected {
            url,
            tee,
            variant,
            detail,
        } => {
            assert_eq!(url, broker.url());
            assert_eq!(tee, "sample");
            assert_eq!(variant, "AttestationError");
            assert_eq!(detail, "Attestation error: RCAR handshake Attest failed");
        }
        other => panic!("expected EvidenceRejected, got {other:?}"),
    }
    assert!(err.to_string().contains("AttestationError"), "{err}");
    assert!(client.attested().is_none());
    assert_eq!(
        tries(&observer),
        [
            ok(Call::Auth, 1),
            (Call::Attest, 1, Outcome::Status(401), false)
        ]
    );
    let log = broker.requests();
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 401, Some(ErrorKind::AttestationError)),
        ]
    );
    // The client did send the (expired) cookie; the broker refused it for its age.
    assert!(log[1].session_cookie);
    let reason = log[1].reason.clone().unwrap();
    assert!(reason.ends_with("expired"), "{reason}");
}

#[test]
fn expired_tokens_rehandshake_a_bounded_number_of_times() {
    let broker = sample_broker(
        sample_policy(),
        Faults {
            expire_tokens_immediately: true,
            ..Faults::default()
        },
    );
    let mut client = http_client(&broker);
    let mut observer = RecordingObserver::default();
    let err = client
        .resource(&uri(), &mut SampleProvider::new(), &mut observer)
        .unwrap_err();
    match &err {
        KbsError::Unauthorized {
            uri,
            requests,
            handshakes,
            status,
            variant,
            detail,
            ..
        } => {
            assert_eq!(uri, "kbs:///default/secrets/x");
            assert_eq!(*requests, MAX_RESOURCE_REQUESTS);
            assert_eq!(*handshakes, MAX_HANDSHAKES);
            assert_eq!(*status, 401);
            assert_eq!(variant, "TokenVerifierError");
            assert_eq!(detail, "Token Verifier error");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert_eq!(MAX_HANDSHAKES, 3);
    let round = [
        req("POST", AUTH, 200, None),
        req("POST", ATTEST, 200, None),
        req(
            "GET",
            &resource_path(),
            401,
            Some(ErrorKind::TokenVerifierError),
        ),
    ];
    let expected: Vec<_> = round.iter().cloned().cycle().take(9).collect();
    assert_eq!(requests(&broker), expected);
    let handshakes = broker.requests().iter().filter(|r| r.path == AUTH).count();
    assert_eq!(handshakes, 3);
    // Each resource request used a fresh session (cookie) and token.
    assert!(broker
        .requests()
        .iter()
        .filter(|r| r.path == resource_path())
        .all(|r| r.session_cookie && r.bearer));
    let expected_tries: Vec<_> = [
        ok(Call::Auth, 1),
        ok(Call::Attest, 1),
        (Call::Resource, 1, Outcome::Status(401), false),
    ]
    .iter()
    .cloned()
    .cycle()
    .take(9)
    .collect();
    assert_eq!(tries(&observer), expected_tries);
}

/// A resource the broker does not hold is answered 401 (PluginInternalError, as Trustee
/// does): the client asks for it exactly 3 times in all — also when the first request reuses
/// the session of an earlier `attest` — and runs no handshake that no request uses.
#[test]
fn a_missing_resource_is_requested_exactly_three_times() {
    let broker = sample_broker(sample_policy(), Faults::default());
    let mut client = http_client(&broker);
    let mut provider = SampleProvider::new();
    let mut observer = RecordingObserver::default();
    client.attest(&mut provider, &mut observer).unwrap();
    let missing = ResourceUri::parse("kbs:///default/secrets/missing").unwrap();
    let err = client
        .resource(&missing, &mut provider, &mut observer)
        .unwrap_err();
    match &err {
        KbsError::Unauthorized {
            requests,
            handshakes,
            variant,
            ..
        } => {
            assert_eq!((*requests, *handshakes), (3, 2));
            assert_eq!(variant, "PluginInternalError");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("refused kbs:///default/secrets/missing 3 times in all"),
        "{message}"
    );
    let gets: Vec<_> = broker
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(gets.len() as u32, MAX_RESOURCE_REQUESTS);
    assert!(gets
        .iter()
        .all(|r| r.path == "/kbs/v0/resource/default/secrets/missing"
            && r.error == Some(ErrorKind::PluginInternalError)));
    assert_eq!(broker.requests().last().unwrap().method, "GET");
}

/// The broker's nonce is bounded (1 KiB) and must be free of control and bidi characters
/// before it is bound into evidence: the client refuses it after /auth, before /attest.
#[test]
fn a_broker_nonce_over_bounds_or_with_bidi_is_refused_before_binding() {
    for (nonce, what) in [
        ("A".repeat(MAX_NONCE + 1), "a nonce of 1025 bytes"),
        (
            "Dn/RSy3S\u{202e}MzL+\u{1b}[2J".to_string(),
            "a nonce with control or bidi/format characters (Dn/RSy3S\\u{202e}MzL+\\u{1b}[2J)",
        ),
    ] {
        let broker = sample_broker(
            sample_policy(),
            Faults {
                nonce: Some(nonce.clone()),
                ..Faults::default()
            },
        );
        let mut client = http_client(&broker);
        let err = client
            .attest(
                &mut SampleProvider::new(),
                &mut RecordingObserver::default(),
            )
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains(what), "{message}");
        assert!(
            !message.contains('\u{202e}') && !message.contains('\u{1b}'),
            "{message}"
        );
        assert_eq!(requests(&broker), [req("POST", AUTH, 200, None)]);
    }
    // At the bound it is accepted, echoed and recorded as sent.
    let nonce = "A".repeat(MAX_NONCE);
    let broker = sample_broker(
        sample_policy(),
        Faults {
            nonce: Some(nonce.clone()),
            ..Faults::default()
        },
    );
    let mut client = http_client(&broker);
    let attested = client
        .attest(
            &mut SampleProvider::new(),
            &mut RecordingObserver::default(),
        )
        .unwrap();
    assert_eq!(attested.nonce, nonce);
}

/// A broker's error detail reaches the operator with ANSI and bidi characters escaped.
#[test]
fn a_broker_error_detail_is_escaped() {
    let broker = sample_broker(
        ResourcePolicy::new(&["sample"], RequiredStatus::Affirming),
        Faults {
            deny_detail: Some("denied\u{1b}]0;owned\u{7}\u{202e}txt.exe\u{2066}".into()),
            ..Faults::default()
        },
    );
    let mut client = http_client(&broker);
    let err = client
        .resource(
            &uri(),
            &mut SampleProvider::new(),
            &mut RecordingObserver::default(),
        )
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("(PolicyDeny: denied\\u{1b}]0;owned\\u{7}\\u{202e}txt.exe\\u{2066})"),
        "{message}"
    );
    assert!(
        !message.chars().any(|c| c.is_control()
            || ('\u{2066}'..='\u{2069}').contains(&c)
            || ('\u{202a}'..='\u{202e}').contains(&c)),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. retries
// ---------------------------------------------------------------------------------------

#[test]
fn transient_503s_are_retried_then_succeed() {
    let broker = sample_broker(
        sample_policy(),
        Faults {
            fail_first_n: 2,
            ..Faults::default()
        },
    );
    let mut client = http_client(&broker);
    let mut provider = SampleProvider::new();
    let mut observer = RecordingObserver::default();
    let released = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    assert_eq!(
        tries(&observer),
        [
            (Call::Auth, 1, Outcome::Status(503), true),
            (Call::Auth, 2, Outcome::Status(503), true),
            ok(Call::Auth, 3),
            ok(Call::Attest, 1),
            ok(Call::Resource, 1),
        ]
    );
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 503, None),
            req("POST", AUTH, 503, None),
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 200, None),
            req("GET", &resource_path(), 200, None),
        ]
    );
}

#[test]
fn persistent_503s_exhaust_the_tries() {
    let broker = sample_broker(
        sample_policy(),
        Faults {
            fail_first_n: 100,
            ..Faults::default()
        },
    );
    let mut config = http_config(&broker);
    config.tries = 3;
    let mut client = Client::new(config).unwrap();
    let mut observer = RecordingObserver::default();
    let err = client
        .resource(&uri(), &mut SampleProvider::new(), &mut observer)
        .unwrap_err();
    match &err {
        KbsError::ServerError {
            call,
            status,
            tries,
            detail,
            ..
        } => {
            assert_eq!(*call, Call::Auth);
            assert_eq!(*status, 503);
            assert_eq!(*tries, 3);
            assert!(detail.contains("injected failure"), "{detail}");
        }
        other => panic!("expected ServerError, got {other:?}"),
    }
    assert_eq!(
        tries(&observer),
        [
            (Call::Auth, 1, Outcome::Status(503), true),
            (Call::Auth, 2, Outcome::Status(503), true),
            (Call::Auth, 3, Outcome::Status(503), false),
        ]
    );
    assert_eq!(broker.requests().len(), 3);
}

// ---------------------------------------------------------------------------------------
// 7. transport security
// ---------------------------------------------------------------------------------------

#[test]
fn plain_http_needs_insecure_http() {
    let broker = sample_broker(sample_policy(), Faults::default());
    let err = Client::new(KbsConfig::new(broker.url())).unwrap_err();
    match &err {
        KbsError::Config { detail } => {
            assert!(detail.contains(broker.url()), "{detail}");
            assert!(detail.contains("plain http://"), "{detail}");
            assert!(detail.contains("insecure_http = true"), "{detail}");
        }
        other => panic!("expected Config, got {other:?}"),
    }
    // And https:// without a CA is refused too (no system roots are ever used).
    let https = broker.url().replace("http://", "https://");
    match Client::new(KbsConfig::new(https.clone())).unwrap_err() {
        KbsError::Config { detail } => {
            assert!(detail.contains(&https), "{detail}");
            assert!(detail.contains("no CA is configured"), "{detail}");
            assert!(detail.contains("attestation.kbs_ca"), "{detail}");
        }
        other => panic!("expected Config, got {other:?}"),
    }
    assert!(broker.requests().is_empty(), "nothing may have been sent");
}

fn tls_broker() -> RunningBroker {
    let config = BrokerConfig {
        allow_sample: true,
        tls: Some(TlsConfig {
            cert: testdata("server.pem"),
            key: testdata("server.key"),
        }),
        ..BrokerConfig::default()
    }
    .with_resource(RESOURCE, &SECRET, sample_policy());
    let broker = Broker::start(config, "127.0.0.1:0").unwrap();
    assert!(
        broker.url().starts_with("https://127.0.0.1:"),
        "{}",
        broker.url()
    );
    broker
}

fn tls_config(broker: &RunningBroker, ca: &str) -> KbsConfig {
    let mut config = KbsConfig::new(broker.url());
    config.ca_pem = Some(std::fs::read(testdata(ca)).unwrap());
    config.ca_path = Some(testdata(ca));
    config
}

#[test]
fn https_pinned_to_the_right_ca_releases() {
    let broker = tls_broker();
    let mut client = Client::new(tls_config(&broker, "ca.pem")).unwrap();
    let mut observer = RecordingObserver::default();
    let released = client
        .resource(&uri(), &mut SampleProvider::new(), &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 200, None),
            req("GET", &resource_path(), 200, None),
        ]
    );
}

#[test]
fn https_pinned_to_another_ca_fails_naming_the_ca() {
    let broker = tls_broker();
    let mut client = Client::new(tls_config(&broker, "other-ca.pem")).unwrap();
    let mut observer = RecordingObserver::default();
    let err = client
        .resource(&uri(), &mut SampleProvider::new(), &mut observer)
        .unwrap_err();
    let ca = testdata("other-ca.pem").display().to_string();
    match &err {
        KbsError::Tls {
            url,
            call,
            ca: named,
            ..
        } => {
            assert_eq!(url, broker.url());
            assert_eq!(*call, Call::Auth);
            assert_eq!(named, &ca);
        }
        other => panic!("expected Tls, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&ca), "{message}");
    assert!(message.contains("attestation.kbs_ca"), "{message}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("UnknownIssuer"), "{source}");
    assert!(source.contains("/kbs/v0/auth"), "{source}");
    // A certificate problem is not retried.
    assert_eq!(observer.attempts.len(), 1);
    assert_eq!(observer.attempts[0].call, Call::Auth);
    assert!(!observer.attempts[0].will_retry);
    assert!(matches!(observer.attempts[0].outcome, Outcome::Error(_)));
    // The handshake failed before any HTTP request reached the broker.
    assert!(broker.requests().is_empty());
}

// ---------------------------------------------------------------------------------------
// 8. TPM end to end (swtpm)
// ---------------------------------------------------------------------------------------

#[path = "common/swtpm.rs"]
mod swtpm;
use swtpm::Swtpm;

/// A broker as the last section of KBS-PROTOCOL.md sets a real Trustee up: `trusted_aks`,
/// the `tpm_pcr15` reference value read by the attestation policy, and a resource policy
/// that releases only to an `affirming` token.
fn trustee_like_broker(trusted_aks: &[&str], pcr15_hex: &str) -> RunningBroker {
    let config = BrokerConfig {
        trusted_aks: trusted_aks.iter().map(|a| a.to_string()).collect(),
        ..BrokerConfig::default()
    }
    .with_reference_value("tpm_pcr15", &[pcr15_hex])
    .with_resource(
        RESOURCE,
        &SECRET,
        ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming),
    );
    Broker::start(config, "127.0.0.1:0").unwrap()
}

fn tpm_broker(ak_public: &str, pcr15_hex: &str) -> RunningBroker {
    let config = BrokerConfig {
        trusted_aks: vec![ak_public.to_string()],
        ..BrokerConfig::default()
    }
    .with_resource(
        RESOURCE,
        &SECRET,
        ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming).with_pcr(15, pcr15_hex),
    );
    Broker::start(config, "127.0.0.1:0").unwrap()
}

#[test]
fn tpm_end_to_end_with_swtpm() {
    let swtpm = Swtpm::start();
    let mut provider = TpmProvider::open(&swtpm.tcti(), AkSource::Create).unwrap();
    let ak_public = provider.describe()["ak_public"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!ak_public.is_empty());

    // The measure stage's one extend, done through the provider's runtime register.
    let measured: [u8; 32] = Sha256::digest(b"cvm-warden kbs_protocol bundle").into();
    let mut register = provider.runtime_register().unwrap().unwrap();
    register.extend(&Digest(measured)).unwrap();
    drop(register);
    let mut chain = [0u8; 64];
    chain[32..].copy_from_slice(&measured);
    let expected_pcr15: [u8; 32] = Sha256::digest(chain).into();
    assert_eq!(provider.pcr_value(15).unwrap(), expected_pcr15);
    let pcr15_hex = hex::encode(expected_pcr15);

    // A broker whose policy requires exactly that PCR 15 and trusts this AK: affirming.
    let broker = tpm_broker(&ak_public, &pcr15_hex);
    let mut client = http_client(&broker);
    let mut observer = RecordingObserver::default();
    let attested = client.attest(&mut provider, &mut observer).unwrap();
    assert_eq!(attested.status.as_deref(), Some("affirming"));
    assert_eq!(attested.tee, "tpm");
    assert!(!attested.insecure);
    assert_eq!(attested.evidence["ak_public"], json!(ak_public));
    let tpm_claims = &annotated(&attested.claims)["tpm"];
    assert_eq!(tpm_claims["pcr15"], json!(pcr15_hex));
    assert_eq!(tpm_claims["ak_trusted"], json!(true));
    let released = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    assert_eq!(
        tries(&observer),
        [
            ok(Call::Auth, 1),
            ok(Call::Attest, 1),
            ok(Call::Resource, 1)
        ]
    );
    let log = broker.requests();
    assert_eq!(log[1].ear_status.as_deref(), Some("affirming"));
    assert_eq!(log.len(), 3);
    assert_eq!(log[2].status, 200);

    // A broker that expects a different PCR 15 (e.g. another bundle) refuses the resource.
    let other: [u8; 32] = Sha256::digest(b"some other bundle").into();
    let wrong = tpm_broker(&ak_public, &hex::encode(other));
    let mut client = http_client(&wrong);
    let mut observer = RecordingObserver::default();
    let err = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap_err();
    match &err {
        KbsError::PolicyDeny { uri, detail, .. } => {
            assert_eq!(uri, "kbs:///default/secrets/x");
            assert_eq!(detail, "Access denied by policy");
        }
        other => panic!("expected PolicyDeny, got {other:?}"),
    }
    // The evidence itself was good (affirming); only the PCR 15 reference differs.
    assert_eq!(
        client.attested().unwrap().status.as_deref(),
        Some("affirming")
    );
    let log = wrong.requests();
    assert_eq!(log.len(), 3);
    assert_eq!(log[2].error, Some(ErrorKind::PolicyDeny));

    // Against a broker set up like Trustee (reference values in the attestation policy), a
    // wrong PCR 15 and an untrusted AK are both a bare PolicyDeny on the wire; the messages
    // differ by what the token says (instance-identity 2: the AK is recognized).
    let (fingerprint, _) = cvm_warden::report::ak_names(&STANDARD.decode(&ak_public).unwrap());
    let refusal = |broker: &RunningBroker, provider: &mut TpmProvider| {
        let mut client = http_client(broker);
        let err = client
            .resource(&uri(), provider, &mut RecordingObserver::default())
            .unwrap_err();
        assert!(matches!(err, KbsError::PolicyDeny { .. }), "{err:?}");
        err.to_string()
    };
    let good = trustee_like_broker(&[&ak_public], &pcr15_hex);
    let mut client = http_client(&good);
    let released = client
        .resource(&uri(), &mut provider, &mut RecordingObserver::default())
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    let wrong_pcr = refusal(
        &trustee_like_broker(&[&ak_public], &hex::encode(other)),
        &mut provider,
    );
    assert!(
        wrong_pcr.contains("ear.status = warning, trust vector executables=33 (unrecognized run-time: a reference value did not match), instance-identity=2 (recognized instance)"),
        "{wrong_pcr}"
    );
    assert!(
        wrong_pcr.contains("so a PCR did not match its reference value"),
        "{wrong_pcr}"
    );
    assert!(wrong_pcr.contains("the token's pcr11 = "), "{wrong_pcr}");
    assert!(
        wrong_pcr.contains(&format!("pcr15 = {pcr15_hex}")),
        "{wrong_pcr}"
    );
    let untrusted = refusal(&trustee_like_broker(&[], &pcr15_hex), &mut provider);
    assert!(
        untrusted.contains("ear.status = warning, trust vector executables=33 (unrecognized run-time: a reference value did not match), instance-identity=0 (no claim)"),
        "{untrusted}"
    );
    assert!(
        untrusted.contains("an AK that is not in trusted_aks"),
        "{untrusted}"
    );
    assert!(
        untrusted.contains(&format!("the AK that signed the quote is {fingerprint}")),
        "{untrusted}"
    );
    assert_ne!(wrong_pcr, untrusted);
    assert_eq!(
        log[2].reason.as_deref(),
        Some(
            format!(
                "PCR 15 is {pcr15_hex}, the policy expects {}",
                hex::encode(other)
            )
            .as_str()
        )
    );
}

// ---------------------------------------------------------------------------------------
// 9. RealBroker (the stage-facing KeyBroker)
// ---------------------------------------------------------------------------------------

#[test]
fn real_broker_attest_fetch_and_checkpoint() {
    let broker = sample_broker(sample_policy(), Faults::default());
    let mut real = RealBroker::with_client(Box::new(SampleProvider::new()), http_client(&broker));

    assert!(real.insecure());
    let described = real.describe();
    assert_eq!(described["tee"], "sample");
    assert_eq!(described["broker"], json!(broker.url()));

    let mut records = Vec::new();
    let attested = real.attest(&mut |v| records.push(v)).unwrap();
    assert_eq!(attested["tee"], "sample");
    assert_eq!(attested["status"], "warning");
    assert_eq!(attested["insecure"], true);
    assert_eq!(attested["broker"], json!(broker.url()));
    assert!(
        attested.get("token").is_none(),
        "the token must not be exposed"
    );
    assert_eq!(
        records,
        [
            json!({"call":"auth","try":1,"resource":null,"outcome":"HTTP 200","will_retry":false}),
            json!({"call":"attest","try":1,"resource":null,"outcome":"HTTP 200","will_retry":false}),
        ]
    );

    let mut records = Vec::new();
    let bytes = real.fetch(&uri(), &mut |v| records.push(v)).unwrap();
    assert_eq!(bytes.as_slice(), SECRET);
    // The attested session was reused: no new handshake.
    assert_eq!(
        records,
        [
            json!({"call":"resource","try":1,"resource":"kbs:///default/secrets/x","outcome":"HTTP 200","will_retry":false})
        ]
    );
    assert_eq!(
        requests(&broker),
        [
            req("POST", AUTH, 200, None),
            req("POST", ATTEST, 200, None),
            req("GET", &resource_path(), 200, None),
        ]
    );

    let mut binding = [0u8; 64];
    for (i, b) in binding.iter_mut().enumerate() {
        *b = 0xf0 ^ (i as u8); // bytes that differ between base64 alphabets
    }
    let checkpoint = real.checkpoint(&binding).unwrap();
    assert_eq!(
        checkpoint,
        json!({
            "tee": "sample",
            "evidence": {"svn": "1", "report_data": STANDARD.encode(&binding[..48])},
        })
    );
    // A checkpoint is local evidence: it talks to no broker.
    assert_eq!(broker.requests().len(), 3);
}

#[test]
fn real_broker_fetch_errors_carry_the_client_error() {
    let broker = sample_broker(
        ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming),
        Faults::default(),
    );
    let mut real = RealBroker::with_client(Box::new(SampleProvider::new()), http_client(&broker));
    let err = real.fetch(&uri(), &mut |_| {}).unwrap_err();
    let kbs = err
        .downcast_ref::<KbsError>()
        .expect("fetch errors are the client's KbsError");
    assert!(matches!(kbs, KbsError::PolicyDeny { .. }), "{kbs:?}");
    assert!(
        err.to_string().contains("kbs:///default/secrets/x"),
        "{err}"
    );
}

/// A handshake the broker forces during a fetch (401) is recorded with its exchange, so no
/// key is ever released under an exchange the audit log does not hold.
#[test]
fn real_broker_records_re_handshakes_during_fetch() {
    let broker = sample_broker(
        sample_policy(),
        Faults {
            expire_tokens_immediately: true,
            ..Faults::default()
        },
    );
    let mut real = RealBroker::with_client(Box::new(SampleProvider::new()), http_client(&broker));
    real.attest(&mut |_| {}).unwrap();
    let first_nonce = broker
        .requests()
        .iter()
        .filter(|r| r.path == "/kbs/v0/auth")
        .count();
    assert_eq!(first_nonce, 1);
    let mut tries = Vec::new();
    let err = real.fetch(&uri(), &mut |t| tries.push(t)).unwrap_err();
    assert!(
        err.to_string().contains("kbs:///default/secrets/x"),
        "{err}"
    );
    let re = tries
        .iter()
        .filter(|t| t["call"] == "re-attested")
        .collect::<Vec<_>>();
    // The broker refused every token: the session from attest() served the first request,
    // and the client re-attested twice for the other two of its 3 requests in all.
    assert_eq!(re.len(), 2, "{tries:#?}");
    assert_eq!(
        tries.iter().filter(|t| t["call"] == "resource").count(),
        3,
        "{tries:#?}"
    );
    assert_eq!(re[0]["resource"], "kbs:///default/secrets/x");
    assert_eq!(re[0]["exchange"]["tee"], "sample");
    assert!(re[0]["exchange"]["nonce"]
        .as_str()
        .is_some_and(|n| !n.is_empty()));
    assert!(re[0]["exchange"].get("token").is_none());
    assert_ne!(re[0]["exchange"]["nonce"], re[1]["exchange"]["nonce"]);
}

// ---------------------------------------------------------------------------------------
// Registration through the admin API (`reference-values --format trustee` + `broker
// register`), then a tpm attestation that the registered values decide.
// ---------------------------------------------------------------------------------------

/// A broker with the admin API on (the key `admin` signs its tokens) and nothing
/// registered: what a fresh Trustee KBS looks like to a model owner.
fn admin_broker(dir: &Path) -> (RunningBroker, cvm_warden::kbs::admin::AdminKey) {
    use cvm_warden::kbs::admin::AdminKey;
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .output()
        .expect("openssl makes the test's admin key");
    let key = AdminKey::from_pem(&out.stdout, "admin.pem").unwrap();
    let public = dir.join("admin.pub.pem");
    std::fs::write(&public, key.public_pem()).unwrap();
    let config = BrokerConfig {
        admin: Some(kbs_test_broker::AdminConfig {
            public_key: public,
            issuer: Some("owner".to_string()),
            audience: Some("kbs".to_string()),
            role: Some("admin".to_string()),
        }),
        ..BrokerConfig::default()
    };
    (Broker::start(config, "127.0.0.1:0").unwrap(), key)
}

fn admin_token(key: &cvm_warden::kbs::admin::AdminKey) -> String {
    let claims = cvm_warden::kbs::admin::AdminClaims {
        issuer: "owner".to_string(),
        audience: "kbs".to_string(),
        role: "admin".to_string(),
        ttl_secs: 300,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    key.token(&claims, now).to_string()
}

fn admin_transport(broker: &RunningBroker) -> cvm_warden::kbs::HttpTransport {
    cvm_warden::kbs::HttpTransport::new(
        broker.url(),
        None,
        "",
        true,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .unwrap()
}

/// The tpm executables rule of an attestation policy, with or without the PCR 15 line.
fn cpu_policy(with_pcr15: bool) -> String {
    let mut rego = String::from(
        "package policy\n\nimport rego.v1\n\nexecutables := 3 if {\n\tinput.tpm\n\tinput.tpm.pcr11 in query_reference_value(\"tpm_pcr11\")\n",
    );
    if with_pcr15 {
        rego.push_str(&format!(
            "\t{}\n",
            cvm_warden::kbs::admin::PCR15_POLICY_LINE
        ));
    }
    rego.push_str("\tinput.tpm.ak_public in query_reference_value(\"trusted_aks\")\n}\n");
    rego
}

#[test]
fn trustee_registration_through_the_admin_api_decides_a_tpm_release() {
    use cvm_warden::kbs::admin::{self, ResourceUpload, TrusteeValues};
    let swtpm = Swtpm::start();
    let mut provider = TpmProvider::open(&swtpm.tcti(), AkSource::Create).unwrap();
    let ak_public = provider.describe()["ak_public"]
        .as_str()
        .unwrap()
        .to_string();
    let measured: [u8; 32] = Sha256::digest(b"cvm-warden trustee bundle").into();
    let mut register = provider.runtime_register().unwrap().unwrap();
    register.extend(&Digest(measured)).unwrap();
    drop(register);
    let pcr15 = hex::encode(provider.pcr_value(15).unwrap());
    let pcr11 = hex::encode(provider.pcr_value(11).unwrap());
    let values = |pcr15: &str| {
        TrusteeValues {
            policy: "test".to_string(),
            tpm_pcr15: Some(pcr15.to_string()),
            tpm_pcr15_running: None,
            tpm_pcr11: Some(pcr11.clone()),
            trusted_aks: vec![ak_public.clone()],
            snp_launch_measurement: None,
            resources: vec![RESOURCE.to_string()],
            gpus: 0,
            warnings: Vec::new(),
        }
        .checked()
        .unwrap()
    };
    let upload = || {
        vec![ResourceUpload {
            path: RESOURCE.to_string(),
            value: zeroize::Zeroizing::new(SECRET.to_vec()),
        }]
    };
    let with_policy = |values: &TrusteeValues, pcr15_line: bool| {
        let mut requests = values.requests();
        requests.push(admin::AdminRequest {
            what: "attestation policy".to_string(),
            path: admin::ATTESTATION_POLICY_PATH.to_string(),
            body: admin::attestation_policy_body(&cpu_policy(pcr15_line)),
        });
        requests
    };
    let dir = tempfile::tempdir().unwrap();

    // 1. The right values, the PCR 15 line in the policy: released.
    let (broker, key) = admin_broker(dir.path());
    let done = admin::register(
        &mut admin_transport(&broker),
        &admin_token(&key),
        &with_policy(&values(&pcr15), true),
        &upload(),
    )
    .unwrap();
    assert_eq!(done.len(), 6, "{done:?}");
    let mut observer = RecordingObserver::default();
    let mut client = http_client(&broker);
    let released = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    assert_eq!(
        client.attested().unwrap().status.as_deref(),
        Some("affirming")
    );

    // 2. Another bundle's PCR 15 registered, the line in the policy: refused.
    let other = hex::encode(Sha256::digest(b"another bundle"));
    let (broker, key) = admin_broker(dir.path());
    admin::register(
        &mut admin_transport(&broker),
        &admin_token(&key),
        &with_policy(&values(&other), true),
        &upload(),
    )
    .unwrap();
    let err = http_client(&broker)
        .resource(&uri(), &mut provider, &mut RecordingObserver::default())
        .unwrap_err();
    assert!(matches!(err, KbsError::PolicyDeny { .. }), "{err:?}");

    // 3. The same wrong PCR 15 without the line: the attestation policy never compares it
    //    (the token says affirming, executables 3), but the resource policy binds the
    //    workload's resources to its PCR 15 itself, so it is still refused.
    let (broker, key) = admin_broker(dir.path());
    admin::register(
        &mut admin_transport(&broker),
        &admin_token(&key),
        &with_policy(&values(&other), false),
        &upload(),
    )
    .unwrap();
    let mut client = http_client(&broker);
    let err = client
        .resource(&uri(), &mut provider, &mut RecordingObserver::default())
        .unwrap_err();
    assert!(matches!(err, KbsError::PolicyDeny { .. }), "{err:?}");
    assert_eq!(
        client.attested().unwrap().status.as_deref(),
        Some("affirming")
    );

    // 4. No tpm_pcr11: the default CPU policy's tpm rule cannot give executables 3.
    let (broker, key) = admin_broker(dir.path());
    let mut no_pcr11 = values(&pcr15);
    no_pcr11.tpm_pcr11 = None;
    admin::register(
        &mut admin_transport(&broker),
        &admin_token(&key),
        &with_policy(&no_pcr11, true),
        &upload(),
    )
    .unwrap();
    let mut client = http_client(&broker);
    let err = client
        .resource(&uri(), &mut provider, &mut RecordingObserver::default())
        .unwrap_err();
    assert!(matches!(err, KbsError::PolicyDeny { .. }), "{err:?}");
    assert_eq!(
        client.attested().unwrap().status.as_deref(),
        Some("warning")
    );

    // 6. Two workloads on one KBS (one merged registration): this TPM, attested with the
    //    first workload's PCR 15, gets its resource and not the second workload's.
    let (broker, key) = admin_broker(dir.path());
    let mut second = values(&other);
    second.resources = vec!["default/secrets/y".to_string()];
    let mut requests = admin::merged_requests(&[values(&pcr15), second]);
    requests.push(admin::AdminRequest {
        what: "attestation policy".to_string(),
        path: admin::ATTESTATION_POLICY_PATH.to_string(),
        body: admin::attestation_policy_body(&cpu_policy(true)),
    });
    let mut uploads = upload();
    uploads.push(ResourceUpload {
        path: "default/secrets/y".to_string(),
        value: zeroize::Zeroizing::new(b"the other site's key".to_vec()),
    });
    admin::register(
        &mut admin_transport(&broker),
        &admin_token(&key),
        &requests,
        &uploads,
    )
    .unwrap();
    let mut client = http_client(&broker);
    let mut observer = RecordingObserver::default();
    let released = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    let theirs = ResourceUri::parse("kbs:///default/secrets/y").unwrap();
    let err = client
        .resource(&theirs, &mut provider, &mut observer)
        .unwrap_err();
    assert!(matches!(err, KbsError::PolicyDeny { .. }), "{err:?}");

    // 5. A token signed by another key registers nothing.
    let (broker, _) = admin_broker(dir.path());
    let (_, stranger) = admin_broker(dir.path());
    let err = admin::register(
        &mut admin_transport(&broker),
        &admin_token(&stranger),
        &values(&pcr15).requests(),
        &upload(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("AdminAuthAccess"),
        "{err}"
    );
    assert_eq!(broker.requests().len(), 1, "stopped at the first refusal");
}

// ---------------------------------------------------------------------------------------
// NVIDIA GPUs beside the TEE: the daemon's GPU provider (simulated GPU) against the test
// broker's own NVIDIA verifier
// ---------------------------------------------------------------------------------------

fn gpu_broker() -> RunningBroker {
    let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nvidia-sim");
    let mut config = BrokerConfig {
        allow_sample: true,
        ..BrokerConfig::default()
    }
    .with_resource(RESOURCE, &SECRET, sample_policy());
    config.nvidia.extra_roots = vec![sim.join("root.pem")];
    config.nvidia.require_gpus = 1;
    Broker::start(config, "127.0.0.1:0").unwrap()
}

fn gpu_provider(
    change: impl FnOnce(&mut cvm_warden::tee::nvidia::fake::FakeNvml),
) -> cvm_warden::tee::nvidia::GpuProvider {
    use cvm_warden::tee::nvidia::{fake::FakeNvml, GpuProvider, GpuRequirements, Gpus};
    let mut nvml = FakeNvml::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nvidia-sim/gpu.json"),
    )
    .unwrap();
    change(&mut nvml);
    let mut gpus = Gpus::new(
        Ok(Box::new(nvml)),
        GpuRequirements {
            required: true,
            count: Some(1),
            arch: vec![],
            min_driver: None,
            min_vbios: None,
            allow_devtools: false,
            simulated: true,
            rims: Vec::new(),
            verify_at: None,
        },
    );
    gpus.precheck().unwrap();
    GpuProvider::new(Box::new(SampleProvider::new()), gpus)
}

#[test]
fn a_simulated_gpus_evidence_is_verified_by_the_broker_and_the_key_released() {
    let broker = gpu_broker();
    let mut client = http_client(&broker);
    let mut provider = gpu_provider(|_| {});
    let mut observer = RecordingObserver::default();
    let attested = client.attest(&mut provider, &mut observer).unwrap();
    assert!(attested
        .additional_evidence
        .starts_with("{\"nvidia\":{\"device_evidence_list\":[{\"arch\":\"HOPPER\""));
    // The broker verified the GPU (its claims under gpu0) and binds the string.
    assert_eq!(
        attested.claims["submods"]["gpu0"]["ear.veraison.annotated-evidence"]["nvidia"]["config"]
            ["driver_version"],
        "550.90.07",
        "{}",
        attested.claims
    );
    let released = client
        .resource(&uri(), &mut provider, &mut observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
}

#[test]
fn a_replayed_gpu_report_with_another_nonce_is_refused_by_the_broker() {
    let broker = gpu_broker();
    let mut client = http_client(&broker);
    // NVIDIA's real H100 vector replayed (genuine signature and chain, NVIDIA's nonce)
    // whatever nonce is asked: only the nonce is wrong.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nvidia");
    let mut provider = gpu_provider(|nvml| {
        let gpu = nvml.gpus.remove(0);
        nvml.gpus
            .push(cvm_warden::tee::nvidia::fake::FakeGpu::replay(
                &gpu.uuid,
                gpu.arch.clone(),
                &gpu.vbios_version,
                std::fs::read(data.join("nvtrust-hopperAttestationReport.bin")).unwrap(),
                std::fs::read(data.join("hopperCertChain.txt")).unwrap(),
            ));
    });
    let mut observer = RecordingObserver::default();
    let error = client.attest(&mut provider, &mut observer).unwrap_err();
    assert!(
        matches!(error, KbsError::EvidenceRejected { .. }),
        "{error:?}"
    );
    // (The broker answers as Trustee does, without the reason: the vector verifies to
    // NVIDIA's root with its own nonce in `evidence verify`, so the nonce is what failed.)
    assert!(requests(&broker).iter().all(|r| r.1 != resource_path()));
}
