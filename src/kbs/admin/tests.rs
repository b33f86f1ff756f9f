use super::*;
use std::cell::RefCell;

/// An Ed25519 key as `openssl genpkey -algorithm ed25519` writes it (PKCS#8 v1), made for
/// these tests only.
fn test_key() -> AdminKey {
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .output()
        .expect("openssl (apt-get install openssl) makes the test's Ed25519 key");
    assert!(out.status.success());
    AdminKey::from_pem(&out.stdout, "test.pem").unwrap()
}

fn values() -> TrusteeValues {
    TrusteeValues {
        policy: "flare-client".to_string(),
        tpm_pcr15: Some("AB".repeat(32)),
        tpm_pcr15_running: None,
        tpm_pcr11: None,
        trusted_aks: vec![STANDARD.encode(b"spki der")],
        snp_launch_measurement: None,
        resources: vec![
            "default/secret/client-key".to_string(),
            "default/key/volume".to_string(),
        ],
        gpus: 0,
        warnings: Vec::new(),
    }
    .checked()
    .unwrap()
}

#[test]
fn values_are_checked_and_lowered() {
    let v = values();
    assert_eq!(v.tpm_pcr15.as_deref(), Some("ab".repeat(32).as_str()));
    for (bad, field) in [
        (
            TrusteeValues {
                tpm_pcr15: Some("ab".repeat(31)),
                ..TrusteeValues::default()
            },
            "tpm_pcr15",
        ),
        (
            TrusteeValues {
                tpm_pcr11: Some("zz".repeat(32)),
                ..TrusteeValues::default()
            },
            "tpm_pcr11",
        ),
        (
            TrusteeValues {
                snp_launch_measurement: Some("ab".repeat(32)),
                ..TrusteeValues::default()
            },
            "snp_launch_measurement",
        ),
        (
            TrusteeValues {
                trusted_aks: vec!["not base64!".to_string()],
                ..TrusteeValues::default()
            },
            "trusted_aks",
        ),
    ] {
        let err = bad.checked().unwrap_err().to_string();
        assert!(err.starts_with(field), "{err}");
    }
}

#[test]
fn reference_value_bodies_are_trustees_sample_shape() {
    let requests = values().requests();
    let what: Vec<&str> = requests.iter().map(|r| r.what.as_str()).collect();
    assert_eq!(
        what,
        [
            "reference value tpm_pcr15",
            "reference value trusted_aks",
            "resource policy"
        ]
    );
    let body = &requests[0].body;
    assert_eq!(requests[0].path, "/kbs/v0/reference-value");
    assert_eq!(body["version"], "0.1.0");
    assert_eq!(body["type"], "sample");
    let payload: Value =
        serde_json::from_slice(&STANDARD.decode(body["payload"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(payload, json!({ "tpm_pcr15": ["ab".repeat(32)] }));
    let policy = URL_SAFE_NO_PAD
        .decode(requests[2].body["policy"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(policy).unwrap(),
        values().resource_policy_rego()
    );
}

#[test]
fn the_resource_policy_lists_the_resources_and_demands_affirming_and_executables_3() {
    let rego = values().resource_policy_rego();
    assert!(rego.starts_with("package policy\n"), "{rego}");
    assert!(rego.contains("default allow := false"));
    // Sorted, each once.
    let list = rego.find("\"default/key/volume\"").unwrap();
    let secret = rego.find("\"default/secret/client-key\"").unwrap();
    assert!(list < secret);
    assert!(rego.contains("data[\"resource-path\"] in cvm_warden_resources"));
    assert!(rego.contains("submod[\"ear.status\"] != \"affirming\""));
    assert!(rego.contains("input.submods.cpu0[\"ear.trustworthiness-vector\"].executables == 3"));
    // No resources: no policy request at all (nothing to release).
    let none = TrusteeValues {
        tpm_pcr15: Some("00".repeat(32)),
        ..TrusteeValues::default()
    };
    assert!(none
        .requests()
        .iter()
        .all(|r| r.path != RESOURCE_POLICY_PATH));
}

#[test]
fn the_printed_json_carries_the_pcr15_line_and_requests_that_read_back() {
    let printed = values().to_json();
    assert_eq!(
        printed["attestation_policy"]["lines"],
        json!([PCR15_POLICY_LINE])
    );
    assert_eq!(
        printed["reference_values"]["tpm_pcr15"],
        json!(["ab".repeat(32)])
    );
    assert_eq!(printed["requests"].as_array().unwrap().len(), 3);
}

#[test]
fn the_token_is_an_eddsa_jwt_the_public_key_verifies() {
    let key = test_key();
    let claims = AdminClaims {
        issuer: "owner".to_string(),
        audience: "kbs".to_string(),
        role: "admin".to_string(),
        ttl_secs: 300,
    };
    let token = key.token(&claims, 1_000);
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    let body: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(
        (
            body["iss"].as_str(),
            body["aud"].as_str(),
            body["role"].as_str()
        ),
        (Some("owner"), Some("kbs"), Some("admin"))
    );
    assert_eq!(
        (body["iat"].as_u64(), body["exp"].as_u64()),
        (Some(1_000), Some(1_300))
    );
    // The public key (as PEM SPKI) verifies the signature; a changed body does not.
    let pem = key.public_pem();
    let der = STANDARD
        .decode(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    assert_eq!(der.len(), 44);
    let public = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &der[12..]);
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    public
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .unwrap();
    assert!(public
        .verify(format!("{}.{}x", parts[0], parts[1]).as_bytes(), &signature)
        .is_err());
    assert_eq!(format!("{key:?}"), "AdminKey(<redacted>)");
}

#[test]
fn a_key_that_is_not_ed25519_is_refused_naming_the_file() {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .output()
        .unwrap();
    let err = AdminKey::from_pem(&out.stdout, "/etc/kbs/admin.pem").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("/etc/kbs/admin.pem") && text.contains("Ed25519"),
        "{text}"
    );
    assert!(!text.contains("PRIVATE KEY-----"), "{text}");
    let err = AdminKey::from_pem(b"nothing", "k.pem")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no PEM PRIVATE KEY"), "{err}");
}

/// One recorded call: path, body, content type, token.
type Call = (String, Vec<u8>, String, String);

#[derive(Default)]
struct Recording {
    calls: RefCell<Vec<Call>>,
    refuse: Option<(String, u16)>,
}

impl AdminTransport for &Recording {
    fn post(
        &mut self,
        path: &str,
        body: &[u8],
        content_type: &str,
        token: &str,
    ) -> Result<HttpResponse, TransportError> {
        self.calls.borrow_mut().push((
            path.to_string(),
            body.to_vec(),
            content_type.to_string(),
            token.to_string(),
        ));
        match &self.refuse {
            Some((p, status)) if p == path => Ok(HttpResponse::new(
                *status,
                b"{\"type\":\"https://github.com/confidential-containers/kbs/errors/AdminAuth\"}"
                    .to_vec(),
            )),
            _ => Ok(HttpResponse::new(200, Vec::new())),
        }
    }
}

#[test]
fn register_posts_values_then_resources_with_the_token_and_stops_at_a_refusal() {
    let recording = Recording::default();
    let resources = [ResourceUpload {
        path: "default/key/volume".to_string(),
        value: Zeroizing::new(b"0123456789abcdef".to_vec()),
    }];
    let done = register(&mut &recording, "tok", &values().requests(), &resources).unwrap();
    assert_eq!(done.len(), 4);
    let calls = recording.calls.borrow();
    let paths: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        paths,
        [
            REFERENCE_VALUE_PATH,
            REFERENCE_VALUE_PATH,
            RESOURCE_POLICY_PATH,
            "/kbs/v0/resource/default/key/volume"
        ]
    );
    assert!(calls.iter().all(|c| c.3 == "tok"));
    assert_eq!(calls[3].1, b"0123456789abcdef");
    assert_eq!(calls[3].2, "application/octet-stream");
    assert_eq!(calls[0].2, "application/json");
    drop(calls);
    assert!(!format!("{:?}", resources[0]).contains("0123"));

    let refusing = Recording {
        refuse: Some((RESOURCE_POLICY_PATH.to_string(), 401)),
        ..Recording::default()
    };
    let err = register(&mut &refusing, "tok", &values().requests(), &resources).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("resource policy")
            && text.contains("HTTP 401")
            && text.contains("--admin-key"),
        "{text}"
    );
    assert_eq!(
        refusing.calls.borrow().len(),
        3,
        "nothing after the refusal"
    );
}

#[test]
fn several_workloads_share_one_resource_policy_each_bound_to_its_pcr15() {
    let site = |pcr: &str, resource: &str| {
        TrusteeValues {
            policy: format!("bundle of {resource}"),
            tpm_pcr15: Some(pcr.repeat(32)),
            tpm_pcr15_running: None,
            tpm_pcr11: Some("00".repeat(32)),
            trusted_aks: vec![STANDARD.encode(resource)],
            snp_launch_measurement: None,
            resources: vec![resource.to_string()],
            gpus: 0,
            warnings: Vec::new(),
        }
        .checked()
        .unwrap()
    };
    let sites = [
        site("aa", "flare/site-1/key"),
        site("bb", "flare/site-2/key"),
    ];
    let requests = merged_requests(&sites);
    let what: Vec<&str> = requests.iter().map(|r| r.what.as_str()).collect();
    assert_eq!(
        what,
        [
            "reference value tpm_pcr15",
            "reference value tpm_pcr11",
            "reference value trusted_aks",
            "resource policy"
        ]
    );
    let payload = |r: &AdminRequest| -> Value {
        serde_json::from_slice(
            &STANDARD
                .decode(r.body["payload"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        payload(&requests[0]),
        json!({ "tpm_pcr15": ["aa".repeat(32), "bb".repeat(32)] })
    );
    assert_eq!(
        payload(&requests[1]),
        json!({ "tpm_pcr11": ["00".repeat(32)] }),
        "each value once"
    );
    let rego = resource_policy_rego(&sites);
    // Each site's resource in its own set, released only with its own PCR 15.
    let first = rego.find("\"flare/site-1/key\"").unwrap();
    let first_pcr = rego
        .find(&format!("tpm.pcr15 == \"{}\"", "aa".repeat(32)))
        .unwrap();
    let second = rego.find("\"flare/site-2/key\"").unwrap();
    let second_pcr = rego
        .find(&format!("tpm.pcr15 == \"{}\"", "bb".repeat(32)))
        .unwrap();
    assert!(
        first < first_pcr && first_pcr < second && second < second_pcr,
        "{rego}"
    );
    assert_eq!(rego.matches("allow if {").count(), 2, "{rego}");
}

#[test]
fn the_printed_values_read_back() {
    let printed = values().to_json();
    let back = TrusteeValues::from_json(&printed).unwrap();
    assert_eq!(back.requests(), values().requests());
    let mut other = printed.clone();
    other["reference_values"]["tpm_pcr11"] = json!(["ab".repeat(32), "cd".repeat(32)]);
    assert!(TrusteeValues::from_json(&other)
        .unwrap_err()
        .to_string()
        .contains("exactly one"));
    let mut other = printed.clone();
    other["reference_values"]["tpm_pcr15"] = json!(["ab"]);
    assert!(
        TrusteeValues::from_json(&other).is_err(),
        "values are checked"
    );
    let mut other = printed;
    other["format"] = json!("json");
    assert!(TrusteeValues::from_json(&other).is_err());
}

/// A re-attesting workload registers PCR 15 at boot and while it runs, and its resources go
/// to either; a workload with GPUs needs the broker's verdict on each, while GPU submodules
/// (never `affirming` under Trustee's local NVIDIA verifier) are left out of the affirming
/// check. The test broker reads the rego and decides as Trustee would.
#[test]
fn running_pcr15_and_gpus_are_registered_and_bound() {
    let mut v = values();
    v.tpm_pcr15_running = Some("CD".repeat(32));
    v.gpus = 2;
    let v = v.checked().unwrap();
    assert_eq!(
        v.reference_values()[0],
        ("tpm_pcr15", vec!["ab".repeat(32), "cd".repeat(32)])
    );
    let back = TrusteeValues::from_json(&v.to_json()).unwrap();
    assert_eq!(back, v);
    let rego = v.resource_policy_rego();
    assert_eq!(rego.matches("allow if {").count(), 2, "{rego}");
    assert_eq!(rego.matches("\tinput.submods.gpu1\n").count(), 2, "{rego}");
    assert!(rego.contains("not startswith(name, \"gpu\")"), "{rego}");
    // A running value without the boot's is refused.
    let mut odd = values();
    odd.tpm_pcr15 = None;
    odd.tpm_pcr15_running = Some("cd".repeat(32));
    assert!(odd.checked().is_err());
    // Three PCR 15 values, or a silly GPU count, do not read back.
    let mut printed = v.to_json();
    printed["reference_values"]["tpm_pcr15"] =
        json!(["ab".repeat(32), "cd".repeat(32), "ef".repeat(32)]);
    assert!(TrusteeValues::from_json(&printed).is_err());
    let mut printed = v.to_json();
    printed["gpus"] = json!(1000);
    assert!(TrusteeValues::from_json(&printed).is_err());
}
