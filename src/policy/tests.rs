//! Policy tests: bad policies with their exact messages, good policies with their values.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use super::*;

fn users() -> MemoryUsers {
    MemoryUsers::new()
        .user("root", 0, 0)
        .user("flare", 1000, 1000)
        .user("sync", 4, 0)
        .group("root", 0)
        .group("flare", 1000)
        .group("workers", 2000)
}

const MINIMAL: &str = r#"attestation = "none"

[workload]
bundle = "/opt/flare"
source = "initramfs"
exec = ["/opt/flare/startup/start.sh"]
user = "flare"
"#;

const GOOD: &str = include_str!("testdata/good.toml");

/// MINIMAL with one line replaced (the line must exist).
fn minimal_with(from: &str, to: &str) -> String {
    assert!(MINIMAL.contains(from), "{from}");
    MINIMAL.replacen(from, to, 1)
}

fn error_of(policy: &str) -> String {
    match parse(policy, None, &users()) {
        Ok(loaded) => panic!("expected an error, got {:#?}", loaded.policy),
        Err(e) => e.to_string(),
    }
}

fn error_with_operator(policy: &str, operator: &str) -> String {
    match parse(policy, Some(operator), &users()) {
        Ok(loaded) => panic!("expected an error, got {:#?}", loaded.policy),
        Err(e) => e.to_string(),
    }
}

// ---- bad policies: exact messages ----

#[test]
fn unknown_key_is_refused_with_its_position() {
    assert_eq!(
        error_of(&minimal_with("bundle =", "bundel =")),
        "policy: unknown key `workload.bundel` at line 4, column 1; expected one of bundle, source, copy_to, digest, manifest, exec, user, group, env, workdir, umask, rlimit, restart, max_restarts, flare"
    );
}

#[test]
fn unknown_top_level_key_is_refused() {
    assert_eq!(
        error_of(&format!("insecure = true\n{MINIMAL}")),
        "policy: unknown key `insecure` at line 1, column 1; expected one of workload, attestation, volume, secret, network, lockdown, kernel, audit, on_failure, overridable"
    );
}

#[test]
fn unknown_key_in_an_array_of_tables_names_its_index() {
    let policy = format!(
        "{MINIMAL}\n[[volume]]\nname = \"a\"\ndevice = \"/dev/vdb\"\nkey = \"kbs:///default/keys/a\"\nmount = \"/a\"\n\n[[volume]]\nnmae = \"b\"\n"
    );
    assert_eq!(
        error_of(&policy),
        "policy: unknown key `volume[1].nmae` at line 16, column 1; expected one of name, device, key, mount, format_if_blank, integrity, allow_exec, owner, group, mode"
    );
}

#[test]
fn syntax_error_is_reported_with_its_position() {
    assert_eq!(
        error_of(&minimal_with("[workload]", "[workload")),
        "policy: invalid TOML at line 3, column 10: invalid table header; expected `.`, `]`"
    );
}

#[test]
fn wrong_type_is_reported_with_key_and_position() {
    assert_eq!(
        error_of(&minimal_with(
            "exec = [\"/opt/flare/startup/start.sh\"]",
            "exec = \"/opt/flare/startup/start.sh\""
        )),
        "policy: `workload.exec` at line 6, column 8: invalid type: string \"/opt/flare/startup/start.sh\", expected an array"
    );
}

#[test]
fn port_given_as_a_string_is_refused() {
    assert_eq!(
        error_of(&format!("{MINIMAL}\n[network]\ninbound = [{{ port = \"8002\" }}]\n")),
        "policy: `network.inbound[0].port` at line 10, column 21: invalid type: string \"8002\", expected an integer"
    );
}

#[test]
fn relative_exec_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "exec = [\"/opt/flare/startup/start.sh\"]",
            "exec = [\"bin/start.sh\", \"--once\"]"
        )),
        "workload.exec[0]: \"bin/start.sh\" is not an absolute path; write the full path inside the image, e.g. \"/opt/flare/startup/start.sh\""
    );
}

#[test]
fn empty_exec_is_refused() {
    assert_eq!(
        error_of(&minimal_with("exec = [\"/opt/flare/startup/start.sh\"]", "exec = []")),
        "workload.exec: the command line is empty; write the program and its arguments, e.g. exec = [\"/opt/flare/startup/start.sh\"]"
    );
}

#[test]
fn relative_bundle_and_parent_components_are_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "bundle = \"/opt/flare\"",
            "bundle = \"opt/flare\"\nworkdir = \"/opt/../etc\""
        )),
        "workload.bundle: \"opt/flare\" is not an absolute path; write the full path inside the image, e.g. \"/opt/flare\"\n\
         workload.workdir: \"/opt/../etc\" contains \"..\"; write the path without \"..\", e.g. \"/workspace\""
    );
}

#[test]
fn missing_attestation_is_refused() {
    assert_eq!(
        error_of(&minimal_with("attestation = \"none\"\n", "")),
        "attestation: missing; configure an [attestation] table (tee, kbs), or write attestation = \"none\" for development"
    );
}

#[test]
fn attestation_string_other_than_none_is_refused() {
    assert_eq!(
        error_of(&minimal_with("attestation = \"none\"", "attestation = \"snp\"")),
        "attestation: \"snp\" is not valid as a string, only \"none\" (development) is; configure an [attestation] table with tee and kbs"
    );
}

#[test]
fn attestation_table_needs_tee_and_kbs() {
    assert_eq!(
        error_of(&minimal_with("attestation = \"none\"", "attestation = {}")),
        "attestation.tee: missing; write the evidence provider: \"snp\", \"tdx\", \"tpm\" or \"az-snp-vtpm\"\n\
         attestation.kbs: missing; write the key broker's URL, e.g. kbs = \"https://kbs.example:8999\""
    );
}

#[test]
fn kbs_url_with_a_bad_scheme_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "attestation = \"none\"",
            "attestation = { tee = \"snp\", kbs = \"ftp://kbs.example:8999\" }"
        )),
        "attestation.kbs: \"ftp://kbs.example:8999\" is not a key broker URL (the scheme must be https:// or http://); write scheme://host[:port][/path], e.g. \"https://kbs.example:8999\""
    );
}

#[test]
fn kbs_url_with_a_bad_port_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "attestation = \"none\"",
            "attestation = { tee = \"tdx\", kbs = \"https://kbs.example:99999\" }"
        )),
        "attestation.kbs: \"https://kbs.example:99999\" is not a key broker URL (port \"99999\" is not a number from 1 to 65535); write scheme://host[:port][/path], e.g. \"https://kbs.example:8999\""
    );
}

#[test]
fn kbs_url_with_user_information_is_refused_without_echoing_it() {
    let err = error_of(&minimal_with(
        "attestation = \"none\"",
        "attestation = { tee = \"snp\", kbs = \"https://admin:hunter2@kbs.example:8999/kbs\" }",
    ));
    assert_eq!(
        err,
        "attestation.kbs: \"https://kbs.example:8999/kbs\" is not a key broker URL (user information (user:password@) is not allowed and is not shown here: credentials never belong in a policy); write scheme://host[:port][/path], e.g. \"https://kbs.example:8999\""
    );
    assert!(!err.contains("hunter2") && !err.contains("admin"), "{err}");
}

#[test]
fn kbs_url_with_an_ipv6_literal_is_accepted() {
    let text = WITH_BROKER.replace("https://kbs.placeholder:8999", "https://[::1]:8080");
    let policy = parse(&text, None, &users()).unwrap().policy;
    let Attestation::Broker { kbs, .. } = &policy.attestation else {
        panic!("{:?}", policy.attestation);
    };
    assert_eq!(kbs, "https://[::1]:8080");
    let url = BrokerUrl::parse(kbs).unwrap();
    assert_eq!(
        (url.https, url.host.as_str(), url.port, url.path.as_str()),
        (true, "::1", 8080, "/")
    );
    assert_eq!(url.authority(), "[::1]:8080");
}

#[test]
fn kbs_url_is_read_as_written() {
    for (url, why) in [
        (
            "https://10.1",
            "the URL parser reads the host as 10.0.0.1, not as written; write 10.0.0.1",
        ),
        (
            "https://010.0.0.1",
            "the URL parser reads the host as 8.0.0.1, not as written; write 8.0.0.1",
        ),
        (
            "https:kbs.example",
            "the scheme must be https:// or http://",
        ),
        (
            "HTTPS://kbs.example",
            "the scheme must be https:// or http://",
        ),
        ("https:///kbs.example", "the host is empty"),
        (
            "https://kbs.example\\\\kbs",
            "it contains a backslash; separate path segments with /",
        ),
        (
            "https://kbs.example/a b",
            "it contains spaces or control characters",
        ),
        (
            "https://kbs_1.example",
            "\"kbs_1.example\" is not a host name or address",
        ),
        (
            "https://kbs.example:0",
            "port \"0\" is not a number from 1 to 65535",
        ),
        (
            "https://kbs.example#x",
            "a query or fragment is not allowed",
        ),
    ] {
        let err = error_of(&minimal_with(
            "attestation = \"none\"",
            &format!("attestation = {{ tee = \"snp\", kbs = \"{url}\" }}"),
        ));
        assert!(err.contains(&format!("({why})")), "{url}: {err}");
    }
}

#[test]
fn unknown_tee_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "attestation = \"none\"",
            "attestation = { tee = \"sev\", kbs = \"https://kbs.example\", kbs_ca = \"/etc/kbs.pem\" }"
        )),
        "attestation.tee: \"sev\" is not an evidence provider; write \"snp\", \"tdx\", \"tpm\", \"az-snp-vtpm\" or \"sample\" (tests only)"
    );
}

#[test]
fn sample_tee_needs_insecure_sample() {
    assert_eq!(
        error_of(&minimal_with(
            "attestation = \"none\"",
            "attestation = { tee = \"sample\", kbs = \"http://127.0.0.1:8080\", insecure_http = true }"
        )),
        "attestation.tee: \"sample\" evidence proves nothing; write insecure_sample = true in [attestation] to use it in tests, or use a real TEE"
    );
    assert_eq!(
        error_of(&minimal_with(
            "attestation = \"none\"",
            "attestation = { tee = \"snp\", kbs = \"https://kbs.example\", insecure_sample = true }"
        )),
        "attestation.insecure_sample: true only applies to tee = \"sample\"; remove it"
    );
}

#[test]
fn root_user_is_refused() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = \"root\"")),
        "workload.user: \"root\" is uid 0; the workload must not run as root; create an unprivileged user in the image"
    );
}

#[test]
fn numeric_uid_zero_is_refused() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = 0")),
        "workload.user: 0 is uid 0; the workload must not run as root; create an unprivileged user in the image"
    );
}

#[test]
fn root_group_is_refused() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = \"flare\"\ngroup = \"root\"")),
        "workload.group: \"root\" is gid 0; the workload must not run as root; create an unprivileged user in the image"
    );
}

#[test]
fn primary_group_root_is_refused() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = \"sync\"")),
        "workload.user: \"sync\" has primary group 0 (root); the workload must not run as root; create an unprivileged user in the image, or set workload.group to an unprivileged group"
    );
}

#[test]
fn unknown_user_is_refused() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = \"flair\"")),
        "workload.user: no user \"flair\" in the image's passwd file; create the user in the image, or write a numeric uid and set workload.group"
    );
}

#[test]
fn unknown_group_is_refused() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = \"flare\"\ngroup = \"flair\"")),
        "workload.group: no group \"flair\" in the image's group file; create the group in the image or write a numeric gid"
    );
}

#[test]
fn numeric_user_without_passwd_entry_needs_a_group() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = 1234")),
        "workload.user: numeric user 1234 has no passwd entry; set `workload.group`"
    );
}

#[test]
fn negative_uid_is_refused() {
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = -1")),
        "workload.user: -1 is not a valid uid; write a number from 1 to 4294967294"
    );
}

#[test]
fn missing_workload_keys_are_all_reported() {
    assert_eq!(
        error_of("attestation = \"none\"\n[workload]\n"),
        "workload.bundle: missing; write the directory to measure, e.g. bundle = \"/opt/flare\"\n\
         workload.source: missing; write where the bundle's bytes live: \"initramfs\" (inside the measured initramfs), \"copy\" (copied into tmpfs while measured) or \"verity\"\n\
         workload.exec: missing; write the workload's command line, e.g. exec = [\"/opt/flare/startup/start.sh\"]\n\
         workload.user: missing; write the unprivileged user the workload runs as, e.g. user = \"flare\""
    );
}

#[test]
fn empty_policy_names_both_required_tables() {
    assert_eq!(
        error_of(""),
        "workload: missing; add a [workload] table with at least bundle, source, exec and user\n\
         attestation: missing; configure an [attestation] table (tee, kbs), or write attestation = \"none\" for development"
    );
}

#[test]
fn unknown_bundle_source_is_refused() {
    assert_eq!(
        error_of(&minimal_with("source = \"initramfs\"", "source = \"disk\"")),
        "workload.source: \"disk\" is not a bundle source; write \"initramfs\", \"copy\" or \"verity\""
    );
}

#[test]
fn copy_to_without_copy_source_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "source = \"initramfs\"",
            "source = \"initramfs\"\ncopy_to = \"/run/copy\""
        )),
        "workload.copy_to: \"/run/copy\" is only used with source = \"copy\"; remove it or set workload.source = \"copy\""
    );
}

#[test]
fn copy_to_inside_the_bundle_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "source = \"initramfs\"",
            "source = \"copy\"\ncopy_to = \"/opt/flare/run\""
        )),
        "workload.copy_to: \"/opt/flare/run\" overlaps workload.bundle \"/opt/flare\"; choose a directory outside the bundle, e.g. \"/run/cvm-warden/bundle\""
    );
}

#[test]
fn malformed_digest_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "source = \"initramfs\"",
            "source = \"initramfs\"\ndigest = \"sha256:ABC\""
        )),
        "workload.digest: \"sha256:ABC\" is not a digest; write \"sha256:\" followed by 64 lowercase hex digits, as `cvm-warden measure` prints it"
    );
}

#[test]
fn bad_env_names_and_values_are_refused() {
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[workload.env]\n1ST = \"a\"\n\"A=B\" = \"b\"\nOK = \"nul\\u0000\"\n"
        )),
        "workload.env.1ST: \"1ST\" is not a valid environment variable name; use letters, digits and \"_\", not starting with a digit\n\
         workload.env.A=B: \"A=B\" is not a valid environment variable name; use letters, digits and \"_\", not starting with a digit\n\
         workload.env.OK: \"nul\\0\" contains a NUL character; remove it"
    );
}

#[test]
fn bad_umask_is_refused() {
    assert_eq!(
        error_of(&minimal_with(
            "user = \"flare\"",
            "user = \"flare\"\numask = \"0999\""
        )),
        "workload.umask: \"0999\" is not an octal umask; write 3 or 4 octal digits, e.g. \"0077\""
    );
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = \"flare\"\numask = 0o077")),
        "workload.umask: 63 is an integer; write the umask as a string of octal digits, e.g. \"0077\""
    );
}

#[test]
fn soft_rlimit_above_hard_is_refused() {
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[[workload.rlimit]]\nresource = \"nofile\"\nsoft = 2048\nhard = 1024\n"
        )),
        "workload.rlimit[0]: soft limit 2048 is above hard limit 1024; lower soft or raise hard"
    );
}

#[test]
fn unknown_and_repeated_rlimits_are_refused() {
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[[workload.rlimit]]\nresource = \"files\"\nsoft = 1\nhard = 1\n\
             [[workload.rlimit]]\nresource = \"core\"\nsoft = 0\nhard = 0\n\
             [[workload.rlimit]]\nresource = \"core\"\nsoft = -1\nhard = \"lots\"\n"
        )),
        "workload.rlimit[0].resource: \"files\" is not a resource; write one of nofile, nproc, core, as, fsize, stack, memlock\n\
         workload.rlimit[2].resource: \"core\" is limited twice; keep one entry per resource\n\
         workload.rlimit[2].soft: -1 is negative; write a number of 0 or more, or \"unlimited\"\n\
         workload.rlimit[2].hard: \"lots\" is not a limit; write a number or \"unlimited\""
    );
}

#[test]
fn max_restarts_is_bounded_and_needs_on_failure() {
    assert_eq!(
        error_of(&minimal_with(
            "user = \"flare\"",
            "user = \"flare\"\nrestart = \"on-failure\"\nmax_restarts = 1000"
        )),
        "workload.max_restarts: 1000 is out of range; write a number from 0 to 100"
    );
    assert_eq!(
        error_of(&minimal_with("user = \"flare\"", "user = \"flare\"\nmax_restarts = 2")),
        "workload.max_restarts: 2 is only used with restart = \"on-failure\"; remove it or set workload.restart = \"on-failure\""
    );
    assert_eq!(
        error_of(&minimal_with(
            "user = \"flare\"",
            "user = \"flare\"\nrestart = \"always\""
        )),
        "workload.restart: \"always\" is not a restart policy; write \"never\" or \"on-failure\""
    );
}

#[test]
fn ports_out_of_range_are_refused() {
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[network]\ninbound = [{{ port = 70000 }}, {{ port = 22, proto = \"sctp\" }}]\noutbound = [{{ host = \"fl-server.example\", port = 0 }}]\n"
        )),
        "network.inbound[0].port: 70000 is out of range; write a port number from 1 to 65535\n\
         network.inbound[1].proto: \"sctp\" is not a protocol; write \"tcp\" or \"udp\"\n\
         network.outbound[0].port: 0 is out of range; write a port number from 1 to 65535"
    );
}

#[test]
fn malformed_cidrs_are_refused() {
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[network]\ninbound = [{{ port = 8002, from = [\"10.0.0.1/8\", \"10.0.0/8\", \"fd00::/129\"] }}]\n"
        )),
        "network.inbound[0].from[0]: \"10.0.0.1/8\" is not a CIDR (it has host bits set; write \"10.0.0.0/8\"); write an address and a prefix length, e.g. \"10.0.0.0/8\" or \"fd00::/8\"\n\
         network.inbound[0].from[1]: \"10.0.0/8\" is not a CIDR (\"10.0.0\" is not an IP address); write an address and a prefix length, e.g. \"10.0.0.0/8\" or \"fd00::/8\"\n\
         network.inbound[0].from[2]: \"fd00::/129\" is not a CIDR (prefix length \"129\" is not from 0 to 128); write an address and a prefix length, e.g. \"10.0.0.0/8\" or \"fd00::/8\""
    );
}

#[test]
fn duplicate_inbound_ports_and_bad_hosts_are_refused() {
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[network]\ninbound = [{{ port = 8002 }}, {{ port = 8002, proto = \"tcp\" }}]\noutbound = [{{ host = \"https://fl.example\", port = 443 }}]\n"
        )),
        "network.inbound[1]: port 8002 is listed twice for the same protocol; merge the entries (list every source in one `from`)\n\
         network.outbound[0].host: \"https://fl.example\" is not a host name or address; write e.g. \"fl-server.example\" or \"10.0.0.5\" (no scheme, no port)"
    );
}

#[test]
fn volume_shape_is_checked() {
    let volume = |name: &str, device: &str, key: &str, mount: &str| {
        format!("\n[[volume]]\nname = \"{name}\"\ndevice = \"{device}\"\nkey = \"{key}\"\nmount = \"{mount}\"\n")
    };
    let policy = format!(
        "{MINIMAL}{}{}{}",
        volume(
            "workspace",
            "/dev/vdb",
            "kbs:///default/keys/workspace",
            "/workspace"
        ),
        volume("workspace", "vdc", "https://kbs/keys/x", "/workspace"),
        volume("bad name", "/dev/vdd", "kbs:///default/keys", "/"),
    );
    assert_eq!(
        error_of(&policy),
        "volume[1].name: \"workspace\" is used by another volume; give each volume its own name\n\
         volume[1].device: \"vdc\" is not an absolute path; write the full path inside the image, e.g. \"/dev/vdb\"\n\
         volume[1].key: \"https://kbs/keys/x\" is not a broker resource; write kbs:///<repo>/<type>/<tag>, e.g. kbs:///default/keys/workspace\n\
         volume[1].mount: \"/workspace\" is used by another volume; give each volume its own mount point\n\
         volume[2].name: \"bad name\" is not a volume name; use 1 to 64 letters, digits, \"_\" or \"-\"\n\
         volume[2].key: \"kbs:///default/keys\" has 2 path segments; write exactly three: kbs:///<repo>/<type>/<tag>\n\
         volume[2].mount: \"/\" cannot be a volume's mount point; mount the volume on a directory, e.g. \"/workspace\"\n\
         volume: attestation = \"none\" releases no keys, so no volume can be unlocked; configure [attestation] with a TEE and a key broker, or remove the [[volume]] entries"
    );
}

#[test]
fn kernel_modules_are_names_listed_once() {
    let loaded = parse(GOOD, None, &users()).unwrap();
    assert_eq!(loaded.policy.kernel.modules, ["virtio_net", "virtio-blk"]);
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[kernel]\nmodules = [\"virtio_net\", \"virtio_net\", \"a/b\"]\n"
        )),
        "kernel.modules[1]: \"virtio_net\" is listed twice; remove one\n\
         kernel.modules[2]: \"a/b\" is not a module name; write the name modprobe takes, e.g. \"dm_crypt\""
    );
}

#[test]
fn lockdown_shape_is_checked() {
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[lockdown]\nconsoles = \"on\"\nkernel_lockdown = \"strict\"\nmodules = [\"dm_crypt\", \"dm_crypt\", \"../evil\"]\n"
        )),
        "lockdown.consoles: \"on\" is not supported; write \"off\" (leave [lockdown] out to keep consoles)\n\
         lockdown.kernel_lockdown: \"strict\" is not a lockdown mode; write \"none\", \"integrity\" or \"confidentiality\"\n\
         lockdown.modules[1]: \"dm_crypt\" is listed twice; remove one\n\
         lockdown.modules[2]: \"../evil\" is not a module name; write the name modprobe takes, e.g. \"dm_crypt\""
    );
}

#[test]
fn bad_syslog_target_is_refused() {
    assert_eq!(
        error_of(&format!("{MINIMAL}\n[audit]\nsyslog = \"udp://fl-server.example\"\n")),
        "audit.syslog: \"udp://fl-server.example\" is not a syslog target (the port is missing); write \"local\", \"udp://host:port\" or \"tcp://host:port\""
    );
    assert_eq!(
        error_of(&format!("{MINIMAL}\n[audit]\nsyslog = \"/dev/log\"\n")),
        "audit.syslog: \"/dev/log\" is not a syslog target (unknown transport); write \"local\", \"udp://host:port\" or \"tcp://host:port\""
    );
}

#[test]
fn required_audit_file_must_be_set() {
    assert_eq!(
        error_of(&format!("{MINIMAL}\n[audit]\nfile_required = true\n")),
        "audit.file_required: true needs a file; set audit.file or remove file_required"
    );
}

#[test]
fn audit_without_any_sink_is_refused() {
    assert_eq!(
        error_of(&format!("{MINIMAL}\n[audit]\nconsole = false\n")),
        "audit: every sink is off (console = false, no file, no syslog; an export port alone does not count: its port may never appear); enable at least one so the boot leaves a record"
    );
}

#[test]
fn audit_export_names_a_virtio_port() {
    let export = |value: &str| {
        let policy = format!("{MINIMAL}\n[audit]\nexport = {value:?}\n");
        parse(&policy, None, &users()).map(|l| l.policy.audit.export_port)
    };
    assert_eq!(
        export("virtio-port:cvm-warden.audit").unwrap(),
        Some("cvm-warden.audit".to_string())
    );
    assert_eq!(
        error_of(&format!(
            "{MINIMAL}\n[audit]\nconsole = false\nexport = \"virtio-port:p\"\n"
        )),
        "audit: every sink is off (console = false, no file, no syslog; an export port alone does not count: its port may never appear); enable at least one so the boot leaves a record"
    );
    for bad in [
        "virtio-port:",
        "virtio-port:a/b",
        "file:/x",
        "virtio-port:a b",
    ] {
        let policy = format!("{MINIMAL}\n[audit]\nexport = {bad:?}\n");
        assert_eq!(
            error_of(&policy),
            format!("audit.export: {bad:?} is not an export target; write \"virtio-port:NAME\" with the virtio-serial port's name (letters, digits, '.', '-', '_', at most 64), e.g. \"virtio-port:cvm-warden.audit\"")
        );
    }
}

#[test]
fn unknown_failure_action_is_refused() {
    assert_eq!(
        error_of(&format!("on_failure = \"reboot\"\n{MINIMAL}")),
        "on_failure: \"reboot\" is not a failure action; write \"poweroff\" or \"halt\""
    );
}

#[test]
fn overridable_keys_must_exist_in_the_schema() {
    assert_eq!(
        error_of(&format!(
            "overridable = [\"attestation.kbs\", \"attestation.url\", \"overridable\", \"attestation.kbs\"]\n{MINIMAL}"
        )),
        "overridable[1]: \"attestation.url\" is not a policy key; write one of workload, workload.bundle, workload.source, workload.copy_to, workload.digest, workload.manifest, workload.exec, workload.user, workload.group, workload.env, workload.workdir, workload.umask, workload.rlimit, workload.restart, workload.max_restarts, workload.flare, workload.flare.startup_kit, workload.flare.root_ca_sha256, workload.flare.withheld, attestation, attestation.tee, attestation.kbs, attestation.kbs_ca, attestation.insecure_sample, attestation.insecure_http, attestation.key_wrap, attestation.tries, attestation.timeout, attestation.tpm, attestation.tpm_ak_handle, attestation.snp_certs, attestation.gpu, attestation.gpu.required, attestation.gpu.count, attestation.gpu.arch, attestation.gpu.min_driver, attestation.gpu.min_vbios, attestation.gpu.allow_devtools, attestation.gpu.rims, attestation.gpu.simulate, attestation.reattest_interval, attestation.reattest_grace, attestation.reattest_resource, volume, secret, network, network.inbound, network.outbound, network.interface, lockdown, lockdown.consoles, lockdown.kernel_lockdown, lockdown.modules, kernel, kernel.modules, audit, audit.file, audit.file_dir, audit.file_required, audit.syslog, audit.console, audit.checkpoint_interval, on_failure, workload.env.<NAME>, network.interface.<NAME> or network.interface.<NAME>.<KEY> (KEY: address, gateway, dns, dhcp, link_timeout)\n\
         overridable[2]: \"overridable\" cannot be overridable; the operator file must not widen what it may set, so remove it\n\
         overridable[3]: \"attestation.kbs\" is listed twice; remove one"
    );
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let policy = "attestation = \"none\"\non_failure = \"explode\"\n\n[workload]\nbundle = \"/opt/flare\"\nsource = \"initramfs\"\nexec = [\"start.sh\"]\nuser = \"root\"\nworkdir = \"workspace\"\n";
    assert_eq!(
        error_of(policy),
        "workload.exec[0]: \"start.sh\" is not an absolute path; write the full path inside the image, e.g. \"/opt/flare/startup/start.sh\"\n\
         workload.user: \"root\" is uid 0; the workload must not run as root; create an unprivileged user in the image\n\
         workload.workdir: \"workspace\" is not an absolute path; write the full path inside the image, e.g. \"/workspace\"\n\
         on_failure: \"explode\" is not a failure action; write \"poweroff\" or \"halt\""
    );
}

// ---- operator file: bad ----

const WITH_BROKER: &str = r#"overridable = ["attestation.kbs", "network.outbound", "workload.env.FL_SERVER"]

[workload]
bundle = "/opt/flare"
source = "initramfs"
digest = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
exec = ["/opt/flare/startup/start.sh"]
user = "flare"

[workload.env]
FL_SERVER = "localhost:8002"

[attestation]
tee = "snp"
kbs = "https://kbs.placeholder:8999"
kbs_ca = "/etc/cvm-warden/kbs-ca.pem"

[network]
"#;

#[test]
fn operator_key_not_declared_overridable_is_refused() {
    assert_eq!(
        error_with_operator(
            WITH_BROKER,
            "[attestation]\nkbs = \"https://kbs.site:8999\"\ntee = \"sample\"\n\n[workload]\nexec = [\"/bin/sh\"]\n"
        ),
        "operator: `attestation.tee` at line 3, column 1 is not overridable: the policy does not declare it in `overridable`; remove it from the operator file\n\
         operator: `workload.exec` at line 6, column 1 is not overridable: the policy does not declare it in `overridable`; remove it from the operator file"
    );
}

#[test]
fn operator_unknown_key_is_refused_with_its_position() {
    assert_eq!(
        error_with_operator(WITH_BROKER, "[attestation]\nkbs_url = \"https://kbs.site\"\n"),
        "operator: unknown key `attestation.kbs_url` at line 2, column 1; expected one of tee, kbs, kbs_ca, insecure_sample, insecure_http, key_wrap, tries, timeout, tpm, tpm_ak_handle, snp_certs, gpu, reattest_interval, reattest_grace, reattest_resource"
    );
}

#[test]
fn operator_value_is_validated_and_named_as_the_operators() {
    assert_eq!(
        error_with_operator(WITH_BROKER, "[attestation]\nkbs = \"kbs.site:8999\"\n"),
        "attestation.kbs (set by operator): \"kbs.site:8999\" is not a key broker URL (the scheme must be https:// or http://); write scheme://host[:port][/path], e.g. \"https://kbs.example:8999\""
    );
}

#[test]
fn operator_cannot_set_a_key_below_a_string() {
    let policy = "overridable = [\"attestation.kbs\"]\nattestation = \"none\"\n\n[workload]\nbundle = \"/opt/flare\"\nsource = \"initramfs\"\nexec = [\"/opt/flare/startup/start.sh\"]\nuser = \"flare\"\n";
    assert_eq!(
        error_with_operator(policy, "attestation.kbs = \"https://kbs.site\"\n"),
        "operator: cannot set `attestation.kbs`: the policy's `attestation` is not a table; declare `attestation` overridable instead so the operator file replaces it whole"
    );
}

// ---- good policies ----

#[test]
fn minimal_policy_gets_the_defaults() {
    let loaded = parse(MINIMAL, None, &users()).unwrap();
    assert_eq!(
        loaded.policy,
        Policy {
            workload: Workload {
                bundle: PathBuf::from("/opt/flare"),
                source: BundleSource::Initramfs,
                digest: None,
                manifest: None,
                exec: vec!["/opt/flare/startup/start.sh".to_string()],
                user: Identity {
                    name: "flare".to_string(),
                    uid: 1000,
                    gid: 1000
                },
                env: Vec::new(),
                workdir: PathBuf::from("/"),
                umask: 0o077,
                rlimits: Vec::new(),
                restart: Restart::Never,
                flare: None,
            },
            attestation: Attestation::None,
            volumes: Vec::new(),
            secrets: Vec::new(),
            network: None,
            lockdown: None,
            kernel: Kernel::default(),
            audit: AuditConfig {
                file: None,
                file_dir: None,
                file_required: false,
                syslog: None,
                console: true,
                checkpoint_interval_secs: 600,
                export_port: None,
            },
            on_failure: FailureAction::Poweroff,
            overridable: Vec::new(),
        }
    );
    assert_eq!(loaded.operator_digest, None);
    assert!(loaded.overridden.is_empty());
}

#[test]
fn copy_source_and_on_failure_restart_get_their_defaults() {
    let policy = format!(
        "{}\n[attestation]\ntee = \"sample\"\nkbs = \"http://127.0.0.1:8080\"\ninsecure_sample = true\ninsecure_http = true\n\n[network]\n",
        minimal_with("source = \"initramfs\"", "source = \"copy\"\nrestart = \"on-failure\"")
            .replace("attestation = \"none\"\n", "")
    );
    let loaded = parse(&policy, None, &users()).unwrap();
    assert_eq!(
        loaded.policy.workload.source,
        BundleSource::Copy {
            into: PathBuf::from("/run/cvm-warden/bundle")
        }
    );
    assert_eq!(
        loaded.policy.workload.restart,
        Restart::OnFailure { max: 3 }
    );
    assert_eq!(
        loaded.policy.attestation,
        Attestation::Broker {
            tee: Tee::Sample,
            kbs: "http://127.0.0.1:8080".to_string(),
            kbs_ca: None,
            insecure_http: true,
            key_wrap: KeyWrap::EcdhEsA256kw,
            tries: 5,
            timeout_secs: 120,
            tpm: "device:/dev/tpmrm0".to_string(),
            tpm_ak_handle: None,
            snp_certs: None,
            gpu: None,
            reattest: default_reattest(),
        }
    );
}

#[test]
fn full_policy_parses_with_every_value() {
    let loaded = parse(GOOD, None, &users()).unwrap();
    let p = &loaded.policy;
    assert_eq!(
        p.workload.source,
        BundleSource::Copy {
            into: PathBuf::from("/run/cvm-warden/bundle")
        }
    );
    assert_eq!(
        p.workload.digest.map(|d| d.to_string()).as_deref(),
        Some("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    );
    assert_eq!(
        p.workload.user,
        Identity {
            name: "flare".to_string(),
            uid: 1000,
            gid: 1000
        }
    );
    assert_eq!(
        p.workload.env,
        vec![
            (
                "FL_SERVER".to_string(),
                "fl-server.example:8002".to_string()
            ),
            ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ]
    );
    assert_eq!(p.workload.umask, 0o027);
    assert_eq!(
        p.workload.rlimits,
        vec![
            Rlimit {
                resource: RlimitResource::Nofile,
                soft: 4096,
                hard: 8192
            },
            Rlimit {
                resource: RlimitResource::Core,
                soft: 0,
                hard: u64::MAX
            },
        ]
    );
    assert_eq!(p.workload.restart, Restart::OnFailure { max: 5 });
    assert_eq!(
        p.attestation,
        Attestation::Broker {
            tee: Tee::Snp,
            kbs: "https://kbs.example:8999".to_string(),
            kbs_ca: Some(PathBuf::from("/etc/cvm-warden/kbs-ca.pem")),
            insecure_http: false,
            key_wrap: KeyWrap::RsaOaep256,
            tries: 3,
            timeout_secs: 90,
            tpm: "device:/dev/tpmrm0".to_string(),
            tpm_ak_handle: Some(0x8101_0002),
            snp_certs: Some(PathBuf::from("/etc/cvm-warden/snp-certs")),
            gpu: Some(Box::new(Gpu {
                required: true,
                count: Some(1),
                arch: vec![GpuArch::Hopper],
                min_driver: Some("550.90.07".to_string()),
                min_vbios: Some("96.00.9f.00.01".to_string()),
                allow_devtools: false,
                rims: vec![PathBuf::from(
                    "/etc/cvm-warden/rims/NV_GPU_DRIVER_GH100_550.90.07.xml"
                )],
                simulate: Some(PathBuf::from("/etc/cvm-warden/nvidia-sim/gpu.json")),
            })),
            reattest: Reattest {
                interval_secs: 600,
                interval_explicit: true,
                grace_secs: 120,
                resource: Some(ResourceUri::parse("kbs:///default/keys/liveness").unwrap()),
            },
        }
    );
    assert_eq!(
        p.volumes,
        vec![Volume {
            name: "workspace".to_string(),
            device: PathBuf::from("/dev/vdb"),
            key: ResourceUri::parse("kbs:///default/keys/workspace").unwrap(),
            mount: PathBuf::from("/workspace"),
            format_if_blank: true,
            integrity: Some("hmac-sha256".to_string()),
            allow_exec: false,
            // The defaults: the workload's uid and gid, mode 0700.
            owner: 1000,
            group: 1000,
            mode: 0o700,
        }]
    );
    assert_eq!(
        p.secrets,
        vec![Secret {
            name: "client.key".to_string(),
            resource: ResourceUri::parse("kbs:///default/secrets/fl-client-key").unwrap(),
            path: PathBuf::from("/run/cvm-warden/secrets/client.key"),
        }]
    );
    assert_eq!(
        p.network,
        Some(Network {
            inbound: vec![
                InboundRule {
                    port: 8002,
                    proto: Proto::Tcp,
                    from: vec![]
                },
                InboundRule {
                    port: 8003,
                    proto: Proto::Tcp,
                    from: vec!["10.0.0.0/8".to_string(), "fd00::/8".to_string()]
                },
            ],
            outbound: vec![
                OutboundRule {
                    host: "fl-server.example".to_string(),
                    port: 8002,
                    proto: Proto::Tcp
                },
                OutboundRule {
                    host: "fl-server.example".to_string(),
                    port: 514,
                    proto: Proto::Udp
                },
            ],
            interfaces: vec![Interface {
                name: "eth0".to_string(),
                addressing: Addressing::Static {
                    address: "10.0.2.15".parse().unwrap(),
                    prefix: 24,
                    gateway: Some("10.0.2.2".parse().unwrap()),
                },
                dns: vec!["10.0.2.3".parse().unwrap()],
                link_timeout_secs: 20,
            }],
        })
    );
    assert_eq!(
        p.lockdown,
        Some(Lockdown {
            consoles: "off".to_string(),
            kernel_lockdown: Some("confidentiality".to_string()),
            modules: vec![
                "dm_crypt".to_string(),
                "nf_tables".to_string(),
                "sev-guest".to_string()
            ],
        })
    );
    assert_eq!(
        p.audit,
        AuditConfig {
            file: Some(PathBuf::from("/workspace/audit/cvm-warden.jsonl")),
            file_dir: Some(PathBuf::from("/workspace/audit")),
            file_required: true,
            syslog: Some(SyslogTarget::Udp("fl-server.example:514".to_string())),
            console: true,
            checkpoint_interval_secs: 600,
            export_port: None,
        }
    );
    assert_eq!(p.on_failure, FailureAction::Halt);
    assert_eq!(
        p.overridable,
        [
            "attestation.kbs",
            "network.outbound",
            "workload.env.FL_SERVER"
        ]
    );
}

#[test]
fn paths_are_normalised() {
    let loaded = parse(
        &minimal_with("bundle = \"/opt/flare\"", "bundle = \"/opt//flare/./\""),
        None,
        &users(),
    )
    .unwrap();
    assert_eq!(loaded.policy.workload.bundle, PathBuf::from("/opt/flare"));
}

#[test]
fn numeric_users_resolve_with_or_without_passwd_entries() {
    let loaded = parse(
        &minimal_with("user = \"flare\"", "user = 1000"),
        None,
        &users(),
    )
    .unwrap();
    assert_eq!(
        loaded.policy.workload.user,
        Identity {
            name: "1000".to_string(),
            uid: 1000,
            gid: 1000
        }
    );
    let loaded = parse(
        &minimal_with("user = \"flare\"", "user = 1234\ngroup = 5678"),
        None,
        &users(),
    )
    .unwrap();
    assert_eq!(
        loaded.policy.workload.user,
        Identity {
            name: "1234".to_string(),
            uid: 1234,
            gid: 5678
        }
    );
    let loaded = parse(
        &minimal_with("user = \"flare\"", "user = \"flare\"\ngroup = \"workers\""),
        None,
        &users(),
    )
    .unwrap();
    assert_eq!(loaded.policy.workload.user.gid, 2000);
}

#[test]
fn policy_digest_is_the_sha256_of_the_bytes() {
    let loaded = parse(MINIMAL, None, &users()).unwrap();
    assert_eq!(
        loaded.policy_digest,
        crate::digest::Digest::of(MINIMAL.as_bytes())
    );
    let operator = "[attestation]\nkbs = \"https://kbs.site:8999\"\n";
    let loaded = parse(WITH_BROKER, Some(operator), &users()).unwrap();
    assert_eq!(
        loaded.policy_digest,
        crate::digest::Digest::of(WITH_BROKER.as_bytes())
    );
    assert_eq!(
        loaded.operator_digest,
        Some(crate::digest::Digest::of(operator.as_bytes()))
    );
}

#[test]
fn operator_overrides_are_applied_and_reported() {
    let operator = "[attestation]\nkbs = \"https://kbs.site:8999\"\n\n[workload.env]\nFL_SERVER = \"fl.site:8002\"\n\n[network]\noutbound = [{ host = \"fl.site\", port = 8002 }]\n";
    let loaded = parse(WITH_BROKER, Some(operator), &users()).unwrap();
    assert_eq!(
        loaded.overridden,
        [
            "attestation.kbs",
            "network.outbound",
            "workload.env.FL_SERVER"
        ]
    );
    assert_eq!(
        loaded.policy.attestation,
        broker(
            Tee::Snp,
            "https://kbs.site:8999",
            Some(PathBuf::from("/etc/cvm-warden/kbs-ca.pem"))
        )
    );
    assert_eq!(
        loaded.policy.workload.env,
        vec![("FL_SERVER".to_string(), "fl.site:8002".to_string())]
    );
    assert_eq!(
        loaded.policy.network,
        Some(Network {
            inbound: vec![],
            outbound: vec![OutboundRule {
                host: "fl.site".to_string(),
                port: 8002,
                proto: Proto::Tcp
            }],
            interfaces: vec![],
        })
    );
}

#[test]
fn an_overridable_table_is_replaced_whole() {
    let policy = format!(
        "overridable = [\"network\"]\n{MINIMAL}\n[network]\ninbound = [{{ port = 8002 }}]\noutbound = [{{ host = \"a.example\", port = 1 }}]\n"
    );
    let operator = "[network]\noutbound = [{ host = \"fl.site\", port = 8002 }]\n";
    let loaded = parse(&policy, Some(operator), &users()).unwrap();
    assert_eq!(loaded.overridden, ["network"]);
    assert_eq!(
        loaded.policy.network,
        Some(Network {
            inbound: vec![],
            outbound: vec![OutboundRule {
                host: "fl.site".to_string(),
                port: 8002,
                proto: Proto::Tcp
            }],
            interfaces: vec![],
        })
    );
}

#[test]
fn trust_anchors_cannot_be_overridable() {
    for key in [
        "workload",
        "workload.digest",
        "workload.manifest",
        "attestation",
        "attestation.tee",
        "attestation.kbs_ca",
        "attestation.insecure_http",
        "attestation.insecure_sample",
        "attestation.tpm_ak_handle",
        "attestation.snp_certs",
        "attestation.reattest_interval",
        "attestation.reattest_grace",
        "attestation.reattest_resource",
        "volume",
        "secret",
    ] {
        let policy = format!("overridable = [\"{key}\"]\n{MINIMAL}");
        assert_eq!(
            error_of(&policy),
            format!("overridable[0]: \"{key}\" decides what the VM trusts or runs, so only the image builder may set it; remove it (overridable keys for deployment values: attestation.kbs, attestation.tries, attestation.timeout, workload.env.<NAME>, network.outbound, …)")
        );
    }
}

#[test]
fn empty_operator_file_changes_nothing_but_is_measured() {
    let loaded = parse(WITH_BROKER, Some(""), &users()).unwrap();
    assert!(loaded.overridden.is_empty());
    assert_eq!(
        loaded.policy,
        parse(WITH_BROKER, None, &users()).unwrap().policy
    );
    assert_eq!(loaded.operator_digest, Some(crate::digest::Digest::of(b"")));
}

#[test]
fn load_reads_the_files_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let operator = dir.path().join("operator.toml");
    std::fs::write(&policy, WITH_BROKER).unwrap();
    std::fs::write(
        &operator,
        "[attestation]\nkbs = \"https://kbs.site:8999\"\n",
    )
    .unwrap();
    let loaded = load(&policy, Some(&operator), &users()).unwrap();
    assert_eq!(loaded.overridden, ["attestation.kbs"]);

    std::fs::write(&operator, "[attestation]\ntee = \"tpm\"\n").unwrap();
    assert_eq!(
        load(&policy, Some(&operator), &users()).unwrap_err().to_string(),
        format!(
            "{}: `attestation.tee` at line 2, column 1 is not overridable: the policy does not declare it in `overridable`; remove it from the operator file",
            operator.display()
        )
    );

    std::fs::write(&policy, "[workload]\nbundel = \"/x\"\n").unwrap();
    assert_eq!(
        load(&policy, None, &users()).unwrap_err().to_string(),
        format!(
            "{}: unknown key `workload.bundel` at line 2, column 1; expected one of bundle, source, copy_to, digest, manifest, exec, user, group, env, workdir, umask, rlimit, restart, max_restarts, flare",
            policy.display()
        )
    );

    std::fs::write(&policy, b"x = \"\xff\"\n").unwrap();
    assert_eq!(
        load(&policy, None, &users()).unwrap_err().to_string(),
        format!(
            "{}: not UTF-8 text (invalid byte at offset 5); save the file as UTF-8",
            policy.display()
        )
    );

    let missing = dir.path().join("missing.toml");
    let error = load(&missing, None, &users()).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "cannot read the policy file {:?}; check the path and its permissions",
            missing
        )
    );
    assert!(std::error::Error::source(&error).is_some());
}

#[test]
fn schema_keys_match_the_full_policy() {
    // good.toml sets every key; every key it sets must be listed, and every listed key set.
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if path == "overridable" {
                continue;
            }
            if path == "network.interface" {
                // Keyed by interface name: each interface's keys are INTERFACE_KEYS.
                for iface in value.as_table().unwrap().values() {
                    let mut keys: Vec<&str> = iface
                        .as_table()
                        .unwrap()
                        .keys()
                        .map(String::as_str)
                        .collect();
                    keys.sort();
                    let mut listed = operator::INTERFACE_KEYS.to_vec();
                    listed.sort();
                    assert_eq!(keys, listed);
                }
                out.push(path);
                continue;
            }
            if let toml::Value::Table(inner) = value {
                if path != "workload.env" {
                    walk(&path, inner, out);
                }
            }
            out.push(path);
        }
    }
    let table: toml::Table = toml::from_str(GOOD).unwrap();
    let mut found = Vec::new();
    walk("", &table, &mut found);
    found.sort();
    let mut listed: Vec<String> = operator::SCHEMA_KEYS
        .iter()
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(found, listed);
}

#[test]
fn normalised_policy_serialises() {
    let loaded = parse(GOOD, None, &users()).unwrap();
    let json = serde_json::to_value(&loaded.policy).unwrap();
    assert_eq!(json["workload"]["source"]["kind"], "copy");
    assert_eq!(json["attestation"]["mode"], "broker");
    assert_eq!(json["audit"]["syslog"]["transport"], "udp");
}

#[test]
fn example_policy_parses() {
    // examples/policy.toml is the demo policy; the demo runs its workload as `nobody`.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policy.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let users = MemoryUsers::new().user("nobody", 65534, 65534);
    if let Err(e) = parse(&text, None, &users) {
        panic!("{} does not validate:\n{e}", path.display());
    }
}

/// An `[attestation]` table with every optional key at its default.
fn broker(tee: Tee, kbs: &str, kbs_ca: Option<PathBuf>) -> Attestation {
    Attestation::Broker {
        tee,
        kbs: kbs.to_string(),
        kbs_ca,
        insecure_http: false,
        key_wrap: KeyWrap::EcdhEsA256kw,
        tries: 5,
        timeout_secs: 120,
        tpm: "device:/dev/tpmrm0".to_string(),
        tpm_ak_handle: None,
        snp_certs: None,
        gpu: None,
        reattest: default_reattest(),
    }
}

/// `reattest_*` unset: every 10 minutes, 5 minutes' grace, no resource.
fn default_reattest() -> Reattest {
    Reattest {
        interval_secs: 600,
        interval_explicit: false,
        grace_secs: 300,
        resource: None,
    }
}

#[test]
fn broker_transport_and_tuning_keys_are_checked() {
    let with = |table: &str| {
        minimal_with(
            "attestation = \"none\"",
            &format!("attestation = {{ {table} }}"),
        )
    };
    assert_eq!(
        error_of(&with("tee = \"tpm\", kbs = \"https://kbs.example\"")),
        "attestation.kbs_ca: missing; write the CA certificate (PEM) the broker's TLS certificate is pinned to, e.g. kbs_ca = \"/etc/cvm-warden/kbs-ca.pem\"; system roots are never used"
    );
    assert_eq!(
        error_of(&with("tee = \"tpm\", kbs = \"http://kbs.example\"")),
        "attestation.kbs: \"http://kbs.example\" is plain HTTP: keys and evidence would cross the network unprotected; use https:// with kbs_ca, or write insecure_http = true (tests only)"
    );
    assert_eq!(
        error_of(&with("tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\", insecure_http = true")),
        "attestation.insecure_http: true only applies to an http:// broker URL; remove it"
    );
    assert_eq!(
        error_of(&with(
            "tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\", key_wrap = \"A128KW\", tries = 0, timeout = \"2h\", tpm = \"/dev/tpm0\", tpm_ak_handle = \"0x01010002\", snp_certs = \"certs\""
        )),
        "attestation.key_wrap: \"A128KW\" is not a key wrapping algorithm; write \"ECDH-ES+A256KW\" (default) or \"RSA-OAEP-256\"\n\
         attestation.tries: 0 is out of range; write a number of tries from 1 to 10\n\
         attestation.timeout: \"2h\" is not a duration from 1s to 1h; write e.g. \"120s\" or \"5m\"\n\
         attestation.tpm: \"/dev/tpm0\" is not a TPM connection; write \"device:/dev/tpmrm0\" (default) or \"swtpm:host=127.0.0.1,port=2321\"\n\
         attestation.tpm_ak_handle: \"0x01010002\" is not a persistent TPM handle; write one from 0x81000000 to 0x81FFFFFF, e.g. \"0x81010002\", or remove it to create the AK each boot\n\
         attestation.snp_certs: \"certs\" is not an absolute path; write the full path inside the image, e.g. \"/etc/cvm-warden/snp-certs\""
    );
}

#[test]
fn secret_shape_is_checked() {
    let broker =
        "attestation = { tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\" }";
    let policy = format!(
        "{}\n[[secret]]\nname = \"client.key\"\nresource = \"kbs:///default/secrets/key\"\n\n[[secret]]\nname = \"client.key\"\nresource = \"kbs:///default/secrets/a b\"\n\n[[secret]]\nname = \"../x\"\n\n[[secret]]\nresource = \"kbs:///r/t/x\"\n\n[network]\n",
        minimal_with("attestation = \"none\"", broker)
    );
    assert_eq!(
        error_of(&policy),
        "secret[1].name: \"client.key\" is used by another secret; give each secret its own name\n\
         secret[1].resource: \"kbs:///default/secrets/a b\": segment \"a b\" must match [a-zA-Z0-9_-][a-zA-Z0-9_.-]* (the broker answers 404 otherwise)\n\
         secret[2].name: \"../x\" is not a secret file name; use 1 to 64 letters, digits, \"_\", \"-\" or \".\", not starting with \".\"\n\
         secret[2].resource: missing; write the broker resource, e.g. resource = \"kbs:///default/secrets/client-key\"\n\
         secret[3].name: missing; write the file name the workload reads, e.g. name = \"client.key\""
    );
    let none = format!("{MINIMAL}\n[[secret]]\nname = \"k\"\nresource = \"kbs:///a/b/c\"\n");
    assert_eq!(
        error_of(&none),
        "secret: attestation = \"none\" releases no secrets; configure [attestation] with a TEE and a key broker, or remove the [[secret]] entries"
    );
}

#[test]
fn tees_without_a_runtime_register_need_a_pinned_digest() {
    for tee in ["snp", "tdx"] {
        let policy = minimal_with(
            "attestation = \"none\"",
            &format!("attestation = {{ tee = \"{tee}\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\" }}"),
        ) + "\n[network]\n";
        assert_eq!(
            error_of(&policy),
            format!("workload.digest: missing; tee = \"{tee}\" has no runtime register, so the key broker cannot see the bundle; pin the bundle digest (cvm-warden measure prints it) so a changed bundle stops the boot before keys are asked for")
        );
        let pinned = policy.replacen(
            "source = \"initramfs\"",
            "source = \"initramfs\"\ndigest = \"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"",
            1,
        );
        parse(&pinned, None, &users()).unwrap();
    }
    // A TPM's PCR 15 carries the bundle to the broker: no pin needed.
    let tpm = minimal_with(
        "attestation = \"none\"",
        "attestation = { tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\" }",
    ) + "\n[network]\n";
    parse(&tpm, None, &users()).unwrap();
}

#[test]
fn only_the_integrity_mode_the_volume_code_formats_is_accepted() {
    let policy = format!(
        "{}\n[[volume]]\nname = \"w\"\ndevice = \"/dev/vdb\"\nkey = \"kbs:///a/b/c\"\nmount = \"/w\"\nintegrity = \"hmac-sha512\"\n\n[network]\n",
        minimal_with(
            "attestation = \"none\"",
            "attestation = { tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\" }"
        )
    );
    assert_eq!(
        error_of(&policy),
        "volume[0].integrity: \"hmac-sha512\" is not an integrity mode; write \"hmac-sha256\" (dm-integrity with HMAC-SHA-256), or remove it"
    );
}

/// A policy with one volume whose table ends with `extra` lines.
fn volume_policy(extra: &str) -> String {
    format!(
        "{}\n[[volume]]\nname = \"w\"\ndevice = \"/dev/vdb\"\nkey = \"kbs:///a/b/c\"\nmount = \"/w\"\n{extra}\n[network]\n",
        minimal_with(
            "attestation = \"none\"",
            "attestation = { tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\" }"
        )
    )
}

#[test]
fn volume_owner_group_and_mode_resolve_names_numbers_and_defaults() {
    let root = |extra: &str| {
        let v = &parse(&volume_policy(extra), None, &users())
            .unwrap_or_else(|e| panic!("{extra}: {e}"))
            .policy
            .volumes[0];
        (v.owner, v.group, v.mode)
    };
    // Defaults: the workload's uid and gid ("flare": 1000, 1000), mode 0700.
    assert_eq!(root(""), (1000, 1000, 0o700));
    // Names resolve through the image's passwd and group files, as the workload user does.
    assert_eq!(
        root("owner = \"sync\"\ngroup = \"workers\"\nmode = \"0750\"\n"),
        (4, 2000, 0o750)
    );
    // The group does not follow the owner: each defaults to the workload's.
    assert_eq!(root("owner = \"sync\"\n"), (4, 1000, 0o700));
    assert_eq!(root("group = \"workers\"\n"), (1000, 2000, 0o700));
    // Numbers need no passwd entry; root may own a volume (the workload then only reads it).
    assert_eq!(
        root("owner = 0\ngroup = 0\nmode = \"755\"\n"),
        (0, 0, 0o755)
    );
    assert_eq!(
        root("owner = 4242\nmode = \"2770\"\n"),
        (4242, 1000, 0o2770)
    );
}

#[test]
fn bad_volume_owner_group_or_mode_is_refused_naming_the_key() {
    for (extra, want) in [
        (
            "owner = \"nobody\"\n",
            "volume[0].owner: no user \"nobody\" in the image's passwd file; create the user in the image or write a numeric uid",
        ),
        (
            "group = \"staff\"\n",
            "volume[0].group: no group \"staff\" in the image's group file; create the group in the image or write a numeric gid",
        ),
        (
            "owner = -1\n",
            "volume[0].owner: -1 is not a valid uid; write a number from 0 to 4294967294",
        ),
        (
            "group = 4294967295\n",
            "volume[0].group: 4294967295 is not a valid gid; write a number from 0 to 4294967294",
        ),
        (
            "mode = 0o700\n",
            "volume[0].mode: 448 is an integer; write the mode as a string of octal digits, e.g. \"0700\"",
        ),
        (
            "mode = \"0800\"\n",
            "volume[0].mode: \"0800\" is not an octal mode; write 3 or 4 octal digits, e.g. \"0700\"",
        ),
        (
            "mode = \"10700\"\n",
            "volume[0].mode: \"10700\" is not an octal mode; write 3 or 4 octal digits, e.g. \"0700\"",
        ),
        (
            "mode = \"rwx\"\n",
            "volume[0].mode: \"rwx\" is not an octal mode; write 3 or 4 octal digits, e.g. \"0700\"",
        ),
    ] {
        assert_eq!(error_of(&volume_policy(extra)), want, "{extra}");
    }
}

#[test]
fn a_key_broker_needs_the_network_perimeter() {
    let policy = minimal_with(
        "attestation = \"none\"",
        "attestation = { tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\" }",
    );
    assert_eq!(
        error_of(&policy),
        "network: missing; a key broker is configured, so the default-deny perimeter must be up before any key is asked for; add a [network] table (with no inbound or outbound entries only the broker is reachable during the boot, and nothing afterwards)"
    );
}

// ---- volume mount points ----

/// A `[[volume]]` entry numbered `i` (own name and device) mounted at `mount`.
fn volume_at(i: usize, mount: &str) -> String {
    format!("\n[[volume]]\nname = \"v{i}\"\ndevice = \"/dev/vd{i}\"\nkey = \"kbs:///default/keys/v{i}\"\nmount = \"{mount}\"\n")
}

const BROKER_TAIL: &str = "\n[attestation]\ntee = \"sample\"\nkbs = \"http://127.0.0.1:8080\"\ninsecure_sample = true\ninsecure_http = true\n\n[network]\n";

/// MINIMAL with a sample broker, `source` and the volumes mounted at `mounts`.
fn with_volumes(source: &str, mounts: &[&str]) -> String {
    let mut policy =
        minimal_with("source = \"initramfs\"", source).replace("attestation = \"none\"\n", "");
    policy.push_str(BROKER_TAIL);
    for (i, mount) in mounts.iter().enumerate() {
        policy.push_str(&volume_at(i, mount));
    }
    policy
}

#[test]
fn volume_mounts_may_not_overlap_the_bundle_or_its_copy() {
    let policy = with_volumes(
        "source = \"copy\"\ncopy_to = \"/srv/copy\"",
        &[
            "/opt/flare",
            "/opt",
            "/opt/flare/data",
            "/opt/./flare//data/x/",
            "/srv/copy",
            "/srv",
            "/srv/copy/x",
            "/opt/flare-data",
        ],
    );
    assert_eq!(
        error_of(&policy),
        "volume[0].mount: \"/opt/flare\" is workload.bundle \"/opt/flare\": a volume there would hide or change the measured bundle the workload runs from; mount the volume on a directory of its own, e.g. \"/workspace\"\n\
         volume[1].mount: \"/opt\" contains workload.bundle \"/opt/flare\": a volume there would hide or change the measured bundle the workload runs from; mount the volume on a directory of its own, e.g. \"/workspace\"\n\
         volume[2].mount: \"/opt/flare/data\" is inside workload.bundle \"/opt/flare\": a volume there would hide or change the measured bundle the workload runs from; mount the volume on a directory of its own, e.g. \"/workspace\"\n\
         volume[3].mount: \"/opt/./flare//data/x/\" is inside workload.bundle \"/opt/flare\": a volume there would hide or change the measured bundle the workload runs from; mount the volume on a directory of its own, e.g. \"/workspace\"\n\
         volume[4].mount: \"/srv/copy\" is workload.copy_to \"/srv/copy\": a volume there would hide or change the measured bundle the workload runs from; mount the volume on a directory of its own, e.g. \"/workspace\"\n\
         volume[5].mount: \"/srv\" contains workload.copy_to \"/srv/copy\": a volume there would hide or change the measured bundle the workload runs from; mount the volume on a directory of its own, e.g. \"/workspace\"\n\
         volume[6].mount: \"/srv/copy/x\" is inside workload.copy_to \"/srv/copy\": a volume there would hide or change the measured bundle the workload runs from; mount the volume on a directory of its own, e.g. \"/workspace\""
    );
}

#[test]
fn volume_mounts_may_not_overlap_system_or_runtime_directories() {
    let policy = with_volumes(
        "source = \"initramfs\"",
        &[
            "/etc",
            "/etc/ssl/",
            "/proc",
            "/sys/x",
            "/dev",
            "/usr/local",
            "/bin",
            "/sbin/x",
            "/lib",
            "/lib64",
            "/libx32/a",
            "/lib32",
            "/boot/efi",
            "/run",
            "/run/cvm-warden",
            "/run/cvm-warden/secrets",
            "/run/cvm-warden/bundle/x",
        ],
    );
    let system = |i: usize, m: &str, how: &str, dir: &str| {
        format!("volume[{i}].mount: \"{m}\" {how} the image's system directory \"{dir}\": a volume there would hide or replace files the boot and the workload rely on; mount the volume on a directory of its own, e.g. \"/workspace\"")
    };
    let runtime = |i: usize, m: &str, how: &str| {
        format!("volume[{i}].mount: \"{m}\" {how} cvm-warden's runtime directory (bundle copy, secrets) \"/run/cvm-warden\": a volume there would hide or replace files the boot and the workload rely on; mount the volume on a directory of its own, e.g. \"/workspace\"")
    };
    let expected = [
        system(0, "/etc", "is", "/etc"),
        system(1, "/etc/ssl/", "is inside", "/etc"),
        system(2, "/proc", "is", "/proc"),
        system(3, "/sys/x", "is inside", "/sys"),
        system(4, "/dev", "is", "/dev"),
        system(5, "/usr/local", "is inside", "/usr"),
        system(6, "/bin", "is", "/bin"),
        system(7, "/sbin/x", "is inside", "/sbin"),
        system(8, "/lib", "is", "/lib"),
        system(9, "/lib64", "is", "/lib64"),
        system(10, "/libx32/a", "is inside", "/libx32"),
        system(11, "/lib32", "is", "/lib32"),
        system(12, "/boot/efi", "is inside", "/boot"),
        runtime(13, "/run", "contains"),
        runtime(14, "/run/cvm-warden", "is"),
        runtime(15, "/run/cvm-warden/secrets", "is inside"),
        runtime(16, "/run/cvm-warden/bundle/x", "is inside"),
    ];
    assert_eq!(error_of(&policy), expected.join("\n"));
}

#[test]
fn volume_mounts_elsewhere_are_accepted_and_normalised() {
    let loaded = parse(
        &with_volumes(
            "source = \"copy\"",
            &[
                "/workspace/",
                "/srv/./data",
                "/opt/flare-data",
                "/var/lib/x",
                "/runner",
                "/etcetera",
            ],
        ),
        None,
        &users(),
    )
    .unwrap();
    let mounts: Vec<PathBuf> = loaded
        .policy
        .volumes
        .iter()
        .map(|v| v.mount.clone())
        .collect();
    assert_eq!(
        mounts,
        [
            "/workspace",
            "/srv/data",
            "/opt/flare-data",
            "/var/lib/x",
            "/runner",
            "/etcetera"
        ]
        .map(PathBuf::from)
    );
}

#[test]
fn volume_mount_with_parent_components_is_refused() {
    assert_eq!(
        error_of(&with_volumes("source = \"initramfs\"", &["/data/../etc"])),
        "volume[0].mount: \"/data/../etc\" contains \"..\"; write the path without \"..\", e.g. \"/workspace\""
    );
}

// ---- overridable environment ----

#[test]
fn the_whole_environment_and_code_loading_variables_are_never_overridable() {
    let policy = format!(
        "overridable = [\"workload.env\", \"workload.env.LD_PRELOAD\", \"workload.env.SSL_CERT_DIR\", \"workload.env.PYTHONPATH\", \"workload.env.NODE_OPTIONS\", \"workload.env.FL_SERVER\", \"workload.env.LD\"]\n{MINIMAL}"
    );
    let never = "LD_*, SSL_CERT_*, PATH, BASH_ENV, ENV, GCONV_PATH, LOCPATH, PYTHONPATH, PYTHONHOME, PYTHONSTARTUP, PYTHONUSERBASE, PERL5LIB, PERLLIB, PERL5OPT, RUBYLIB, RUBYOPT, NODE_OPTIONS, NODE_PATH, NODE_EXTRA_CA_CERTS, JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS, _JAVA_OPTIONS, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH";
    let refused = |i: usize, name: &str| {
        format!("overridable[{i}]: \"workload.env.{name}\": {name} makes programs load code or trust anchors from where it points, so only the image builder may set it; set it in [workload.env] and remove it from overridable (never overridable: {never})")
    };
    assert_eq!(
        error_of(&policy),
        [
            "overridable[0]: \"workload.env\" would let the operator file replace the workload's whole environment; list each variable it may set as \"workload.env.<NAME>\" instead".to_string(),
            refused(1, "LD_PRELOAD"),
            refused(2, "SSL_CERT_DIR"),
            refused(3, "PYTHONPATH"),
            refused(4, "NODE_OPTIONS"),
        ]
        .join("\n")
    );
    for name in [
        "BASH_ENV",
        "ENV",
        "PERL5LIB",
        "PERL5OPT",
        "RUBYOPT",
        "GCONV_PATH",
        "LD_LIBRARY_PATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "PATH",
    ] {
        let policy = format!("overridable = [\"workload.env.{name}\"]\n{MINIMAL}");
        assert_eq!(error_of(&policy), refused(0, name));
    }
    // The image builder may still set them.
    let policy = format!("{MINIMAL}\n[workload.env]\nPYTHONPATH = \"/opt/flare/lib\"\nLD_LIBRARY_PATH = \"/opt/flare/lib\"\n");
    assert_eq!(
        parse(&policy, None, &users())
            .unwrap()
            .policy
            .workload
            .env
            .len(),
        2
    );
}

// ---- audit.file_dir ----

fn audit_policy(overridable: &str, audit: &str) -> String {
    format!("overridable = [{overridable}]\n{MINIMAL}\n[audit]\n{audit}")
}

#[test]
fn an_overridable_audit_file_needs_a_file_dir() {
    for key in ["\"audit.file\"", "\"audit\""] {
        assert_eq!(
            error_of(&audit_policy(key, "file = \"/workspace/audit/a.jsonl\"\n")),
            "audit.file_dir: missing; audit.file is overridable, so name the directory the operator's audit file must lie in, e.g. file_dir = \"/workspace/audit\""
        );
    }
    // Without an [audit] table too.
    assert_eq!(
        error_of(&format!("overridable = [\"audit.file\"]\n{MINIMAL}")),
        "audit.file_dir: missing; audit.file is overridable, so name the directory the operator's audit file must lie in, e.g. file_dir = \"/workspace/audit\""
    );
}

#[test]
fn audit_file_dir_is_never_a_system_directory_nor_overridable() {
    let refused = |value: &str, how: &str, dir: &str| {
        format!("audit.file_dir: \"{value}\" {how} the image's system directory \"{dir}\", where an audit file could overwrite what the system reads; name a directory for audit logs only, e.g. \"/workspace/audit\"")
    };
    for (value, how, dir) in [
        ("/etc", "is", "/etc"),
        ("/etc/cvm-warden/", "is inside", "/etc"),
        ("/proc/self", "is inside", "/proc"),
        ("/sys", "is", "/sys"),
        ("/dev/shm", "is inside", "/dev"),
        ("/usr/./share", "is inside", "/usr"),
        ("/", "contains", "/etc"),
    ] {
        assert_eq!(
            error_of(&audit_policy(
                "\"audit.file\"",
                &format!("file_dir = \"{value}\"\n")
            )),
            refused(value, how, dir)
        );
    }
    assert_eq!(
        error_of(&audit_policy("\"audit.file\"", "file_dir = \"/var/log/../../etc\"\n")),
        "audit.file_dir: \"/var/log/../../etc\" contains \"..\"; write the path without \"..\", e.g. \"/workspace/audit\""
    );
    assert_eq!(
        error_of(&audit_policy("\"audit.file_dir\"", "file_dir = \"/var/log/cvm\"\n")),
        "overridable[0]: \"audit.file_dir\" is the directory that confines an overridable audit.file, so only the image builder may set it; remove it"
    );
}

#[test]
fn the_audit_file_must_lie_in_file_dir() {
    let policy = audit_policy(
        "\"audit.file\"",
        "file = \"/workspace/audit/a.jsonl\"\nfile_dir = \"/workspace/audit/\"\n",
    );
    let loaded = parse(&policy, None, &users()).unwrap();
    assert_eq!(
        loaded.policy.audit.file_dir,
        Some(PathBuf::from("/workspace/audit"))
    );

    // The operator's value inside the directory is taken.
    let loaded = parse(
        &policy,
        Some("[audit]\nfile = \"/workspace/audit/./site/b.jsonl\"\n"),
        &users(),
    )
    .unwrap();
    assert_eq!(
        loaded.policy.audit.file,
        Some(PathBuf::from("/workspace/audit/site/b.jsonl"))
    );

    for (value, shown) in [
        ("/etc/cron.d/x", "/etc/cron.d/x"),
        ("/workspace/audit", "/workspace/audit"),
        ("/workspace/audit-x/a", "/workspace/audit-x/a"),
        ("/workspace/a.jsonl", "/workspace/a.jsonl"),
    ] {
        assert_eq!(
            error_with_operator(&policy, &format!("[audit]\nfile = \"{value}\"\n")),
            format!("audit.file (set by operator): \"{shown}\" is outside audit.file_dir \"/workspace/audit\"; write a path inside \"/workspace/audit\"")
        );
    }
    assert_eq!(
        error_with_operator(&policy, "[audit]\nfile = \"/workspace/audit/../../etc/passwd\"\n"),
        "audit.file (set by operator): \"/workspace/audit/../../etc/passwd\" contains \"..\"; write the path without \"..\", e.g. \"/workspace/audit/cvm-warden.jsonl\""
    );
    // The policy's own file is held to its directory too.
    assert_eq!(
        error_of(&audit_policy("", "file = \"/var/log/a.jsonl\"\nfile_dir = \"/workspace/audit\"\n")),
        "audit.file: \"/var/log/a.jsonl\" is outside audit.file_dir \"/workspace/audit\"; write a path inside \"/workspace/audit\""
    );
}

#[test]
fn an_audit_table_replaced_whole_keeps_the_policys_file_dir() {
    let policy = audit_policy(
        "\"audit\"",
        "file = \"/workspace/audit/a.jsonl\"\nfile_dir = \"/workspace/audit\"\n",
    );
    assert_eq!(
        error_with_operator(&policy, "[audit]\nfile = \"/etc/x\"\nfile_dir = \"/etc\"\n"),
        "operator: `audit.file_dir` at line 3, column 1 cannot be set by the operator file: it confines audit.file, so only the policy sets it; remove it from the operator file"
    );
    assert_eq!(
        error_with_operator(&policy, "[audit]\nfile = \"/etc/x\"\n"),
        "audit.file (set by operator): \"/etc/x\" is outside audit.file_dir \"/workspace/audit\"; write a path inside \"/workspace/audit\""
    );
    let loaded = parse(
        &policy,
        Some("[audit]\nfile = \"/workspace/audit/b\"\nconsole = false\n"),
        &users(),
    )
    .unwrap();
    assert_eq!(
        loaded.policy.audit.file_dir,
        Some(PathBuf::from("/workspace/audit"))
    );
    assert_eq!(
        loaded.policy.audit.file,
        Some(PathBuf::from("/workspace/audit/b"))
    );
    assert!(!loaded.policy.audit.console);
}

// ---- large operator files ----

/// 20,000 keys: every error is found (this took 20 s when the look-ups were quadratic).
#[test]
fn an_operator_file_with_20000_keys_gets_every_error() {
    const N: usize = 20_000;
    let mut operator = String::from("[workload.env]\n");
    for i in 0..N {
        operator.push_str(&format!("K{i} = \"v\"\n"));
    }
    let error = error_with_operator(WITH_BROKER, &operator);
    let lines: Vec<&str> = error.lines().collect();
    assert_eq!(lines.len(), N);
    // Keys come in the table's (sorted) order; each names its own line.
    let mut expected: Vec<(String, usize)> = (0..N).map(|i| (format!("K{i}"), i + 2)).collect();
    expected.sort();
    for (line, (key, at)) in lines.iter().zip(&expected) {
        assert_eq!(
            *line,
            format!("operator: `workload.env.{key}` at line {at}, column 1 is not overridable: the policy does not declare it in `overridable`; remove it from the operator file")
        );
    }

    // The same number of overridable keys, each with a bad value.
    let mut policy = String::from("overridable = [");
    for i in 0..N {
        policy.push_str(&format!("\"workload.env.K{i}\", "));
    }
    policy.push_str("]\n");
    policy.push_str(MINIMAL);
    let mut operator = String::from("[workload.env]\n");
    for i in 0..N {
        operator.push_str(&format!("K{i} = \"v\\u0000\"\n"));
    }
    let error = error_with_operator(&policy, &operator);
    let lines: Vec<&str> = error.lines().collect();
    assert_eq!(lines.len(), N);
    for (line, (key, _)) in lines.iter().zip(&expected) {
        assert_eq!(
            *line,
            format!("workload.env.{key} (set by operator): \"v\\0\" contains a NUL character; remove it")
        );
    }
}

#[test]
fn audit_checkpoint_interval_defaults_to_ten_minutes_and_zero_turns_it_off() {
    let interval = |value: &str| {
        let policy = format!("{MINIMAL}\n[audit]\ncheckpoint_interval = {value:?}\n");
        parse(&policy, None, &users()).map(|l| l.policy.audit.checkpoint_interval_secs)
    };
    let default = parse(MINIMAL, None, &users()).unwrap();
    assert_eq!(default.policy.audit.checkpoint_interval_secs, 600);
    assert_eq!(interval("0").unwrap(), 0);
    assert_eq!(interval("90s").unwrap(), 90);
    assert_eq!(interval("1h").unwrap(), 3600);
    for bad in ["5s", "25h", "soon"] {
        let policy = format!("{MINIMAL}\n[audit]\ncheckpoint_interval = {bad:?}\n");
        assert_eq!(
            error_of(&policy),
            format!("audit.checkpoint_interval: {bad:?} is not a duration from 10s to 24h; write e.g. \"10m\", or \"0\" for no periodic checkpoints")
        );
    }
}

#[test]
fn interfaces_take_a_static_address_or_dhcp() {
    let policy = format!(
        "{MINIMAL}\n[network.interface.eth1]\ndhcp = true\ndns = [\"fd00::53\"]\n\n[network.interface.eth0]\naddress = \"192.168.1.10/31\"\n"
    );
    let p = parse(&policy, None, &users()).unwrap().policy;
    let interfaces = p.network.unwrap().interfaces;
    assert_eq!(
        interfaces,
        vec![
            Interface {
                name: "eth0".to_string(),
                addressing: Addressing::Static {
                    address: "192.168.1.10".parse().unwrap(),
                    prefix: 31,
                    gateway: None,
                },
                dns: vec![],
                link_timeout_secs: DEFAULT_LINK_TIMEOUT_SECS,
            },
            Interface {
                name: "eth1".to_string(),
                addressing: Addressing::Dhcp,
                dns: vec!["fd00::53".parse().unwrap()],
                link_timeout_secs: DEFAULT_LINK_TIMEOUT_SECS,
            },
        ]
    );
}

#[test]
fn bad_interfaces_are_named_with_the_value_and_the_fix() {
    let policy = format!(
        "{MINIMAL}\n\
         [network.interface.lo]\naddress = \"127.0.0.2/8\"\n\
         [network.interface.\"e/x\"]\ndhcp = true\n\
         [network.interface.a]\naddress = \"10.0.2.0/24\"\ngateway = \"10.0.3.1\"\n\
         [network.interface.b]\ndhcp = true\naddress = \"10.0.2.15/24\"\n\
         [network.interface.c]\ndhcp = true\ngateway = \"10.0.2.2\"\nlink_timeout = \"1h\"\n\
         [network.interface.d]\ndns = [\"x\"]\n\
         [network.interface.e]\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.3.1\"\n"
    );
    assert_eq!(
        error_of(&policy),
        "network.interface.a.address: \"10.0.2.0/24\" 10.0.2.0 is the network address of /24; write an IPv4 address with its prefix length, e.g. \"10.0.2.15/24\"\n\
         network.interface.b.dhcp: dhcp = true and an `address` are both set; remove `address` (and `gateway`) to take them from a DHCP lease, or remove `dhcp`\n\
         network.interface.c.gateway: \"10.0.2.2\": with dhcp = true the router comes from the lease; remove `gateway`\n\
         network.interface.c.link_timeout: \"1h\" is not a duration from 1s to 5m; write e.g. \"10s\"\n\
         network.interface.d.address: missing; write an IPv4 address with its prefix length, e.g. address = \"10.0.2.15/24\", or dhcp = true\n\
         network.interface.d.dns[0]: \"x\" is not a name server address; write an IP address, e.g. \"10.0.2.3\"\n\
         network.interface.e.gateway: \"10.0.3.1\" is outside 10.0.2.15/24, so it cannot be reached on the link; write the router's address in that subnet, or fix the prefix length\n\
         network.interface.e/x: \"e/x\" is not an interface name; write the kernel's name (1 to 15 characters, no \"/\", \":\" or spaces), e.g. [network.interface.eth0]\n\
         network.interface.lo: the loopback interface is always brought up (127.0.0.1/8) in the PID 1 shape; remove [network.interface.lo]"
    );
}

#[test]
fn more_than_three_name_servers_are_refused() {
    let policy = format!(
        "{MINIMAL}\n[network.interface.eth0]\ndhcp = true\ndns = [\"10.0.0.1\", \"10.0.0.2\"]\n[network.interface.eth1]\ndhcp = true\ndns = [\"10.0.0.3\", \"10.0.0.4\"]\n"
    );
    assert_eq!(
        error_of(&policy),
        "network.interface: 4 name servers in all (10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4); the resolver reads at most 3 from /etc/resolv.conf, so list at most 3 across the interfaces' `dns`"
    );
}

#[test]
fn the_operator_file_sets_an_interfaces_declared_keys() {
    let policy = format!(
        "overridable = [\"network.interface.eth0.address\", \"network.interface.eth0.gateway\", \"network.interface.eth0.dns\"]\n{MINIMAL}\n[network.interface.eth0]\nlink_timeout = \"5s\"\n"
    );
    let operator = "[network.interface.eth0]\naddress = \"10.1.0.5/16\"\ngateway = \"10.1.0.1\"\ndns = [\"10.1.0.53\"]\n";
    let loaded = parse(&policy, Some(operator), &users()).unwrap();
    assert_eq!(
        loaded.overridden,
        [
            "network.interface.eth0.address",
            "network.interface.eth0.dns",
            "network.interface.eth0.gateway"
        ]
    );
    assert_eq!(
        loaded.policy.network.unwrap().interfaces,
        vec![Interface {
            name: "eth0".to_string(),
            addressing: Addressing::Static {
                address: "10.1.0.5".parse().unwrap(),
                prefix: 16,
                gateway: Some("10.1.0.1".parse().unwrap()),
            },
            dns: vec!["10.1.0.53".parse().unwrap()],
            link_timeout_secs: 5,
        }]
    );
    // Not declared: the link timeout, another interface.
    let operator = "[network.interface.eth0]\naddress = \"10.1.0.5/16\"\nlink_timeout = \"1s\"\n[network.interface.eth1]\ndhcp = true\n";
    let problems = parse(&policy, Some(operator), &users())
        .unwrap_err()
        .problems();
    assert_eq!(
        problems,
        [
            "operator: `network.interface.eth0.link_timeout` at line 3, column 1 is not overridable: the policy does not declare it in `overridable`; remove it from the operator file",
            "operator: `network.interface.eth1.dhcp` at line 5, column 1 is not overridable: the policy does not declare it in `overridable`; remove it from the operator file",
        ]
    );
    // An invalid value set by the operator says so.
    let operator = "[network.interface.eth0]\naddress = \"10.1.0.5\"\n";
    assert_eq!(
        parse(&policy, Some(operator), &users())
            .unwrap_err()
            .problems(),
        ["network.interface.eth0.address (set by operator): \"10.1.0.5\" has no prefix length; write an IPv4 address with its prefix length, e.g. \"10.0.2.15/24\""]
    );
    // Unknown interface keys cannot be declared.
    let policy = format!("overridable = [\"network.interface.eth0.mtu\"]\n{MINIMAL}\n");
    assert!(error_of(&policy)
        .starts_with("overridable[0]: \"network.interface.eth0.mtu\" is not a policy key"));
}

// ---- [workload.flare] ----

const KIT_PIN: &str = "sha256:ead69c5f385093cc35e259843dd099df0bd32d7f0d0104d7f27c05dcf736c64a";

fn with_flare(table: &str) -> String {
    format!("{MINIMAL}\n[workload.flare]\n{table}")
}

#[test]
fn flare_kit_paths_are_kept_relative_to_the_bundle_and_pins_read_in_every_form() {
    let openssl = "EA:D6:9C:5F:38:50:93:CC:35:E2:59:84:3D:D0:99:DF:0B:D3:2D:7F:0D:01:04:D7:F2:7C:05:DC:F7:36:C6:4A";
    let bare = "EAD69C5F385093CC35E259843DD099DF0BD32D7F0D0104D7F27C05DCF736C64A";
    for (kit, pin, rel) in [
        ("site-1", KIT_PIN, "site-1"),
        ("./kits/site-1/", openssl, "kits/site-1"),
        ("/opt/flare/site-1", bare, "site-1"),
        ("/opt/flare", KIT_PIN, ""),
        (".", KIT_PIN, ""),
    ] {
        let text = with_flare(&format!(
            "startup_kit = {kit:?}\nroot_ca_sha256 = {pin:?}\nwithheld = [\"startup/client.key\", \"./startup/x.key\"]\n"
        ));
        let loaded = parse(&text, None, &users()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            loaded.policy.workload.flare,
            Some(FlareKit {
                startup_kit: PathBuf::from(rel),
                root_ca_sha256: KIT_PIN.parse().unwrap(),
                withheld: vec![
                    "startup/client.key".to_string(),
                    "startup/x.key".to_string()
                ],
            }),
            "{kit}"
        );
    }
    let loaded = parse(
        &with_flare(&format!(
            "startup_kit = \"site-1\"\nroot_ca_sha256 = {KIT_PIN:?}\n"
        )),
        None,
        &users(),
    )
    .unwrap();
    let flare = loaded.policy.workload.flare.unwrap();
    assert!(flare.withheld.is_empty());
    // `policy check` prints it with the pin in the project's digest form.
    let json = serde_json::to_value(&flare).unwrap();
    assert_eq!(json["root_ca_sha256"], KIT_PIN);
    assert_eq!(json["startup_kit"], "site-1");
}

#[test]
fn flare_table_problems_are_named() {
    assert_eq!(
        error_of(&with_flare("withheld = []\n")),
        "workload.flare.startup_kit: missing; write the participant folder that `nvflare provision` wrote (it holds startup/, local/, transfer/), relative to workload.bundle, e.g. startup_kit = \"site-1\"\n\
         workload.flare.root_ca_sha256: missing; pin the project's root CA: write the SHA-256 fingerprint of the kit's startup/rootCA.pem, as `openssl x509 -in startup/rootCA.pem -noout -fingerprint -sha256` prints it"
    );
    assert_eq!(
        error_of(&with_flare(&format!(
            "startup_kit = \"/srv/kits/site-1\"\nroot_ca_sha256 = {KIT_PIN:?}\n"
        ))),
        "workload.flare.startup_kit: \"/srv/kits/site-1\" is outside workload.bundle \"/opt/flare\"; the kit must be in the bundle, so that it is measured and (with source = \"copy\") read from the verified copy the workload runs from: move it there, or write it relative to the bundle"
    );
    let error = error_of(&with_flare(
        "startup_kit = \"../site-1\"\nroot_ca_sha256 = \"sha256:abc\"\nwithheld = [\"startup/client.key\", \"startup/client.key\", \"startup/rootCA.pem\", \"local/signature.json\", \"/etc/x\"]\n",
    ));
    let lines: Vec<&str> = error.lines().collect();
    assert_eq!(lines.len(), 6, "{error}");
    assert!(lines[0].starts_with("workload.flare.startup_kit: \"../site-1\" is not a relative path inside the kit or bundle"), "{error}");
    assert!(lines[1].starts_with("workload.flare.root_ca_sha256: \"sha256:abc\" is not a SHA-256 fingerprint; write what `openssl x509"), "{error}");
    assert_eq!(
        lines[2],
        "workload.flare.withheld[1]: \"startup/client.key\" is listed twice; remove one"
    );
    assert!(
        lines[3]
            .starts_with("workload.flare.withheld[2]: \"startup/rootCA.pem\" cannot be withheld"),
        "{error}"
    );
    assert!(
        lines[4]
            .starts_with("workload.flare.withheld[3]: \"local/signature.json\" cannot be withheld"),
        "{error}"
    );
    assert!(
        lines[5].starts_with("workload.flare.withheld[4]: \"/etc/x\" is not a relative path"),
        "{error}"
    );
    assert_eq!(
        error_of(&with_flare(&format!(
            "startup_kit = \"site-1\"\nroot_ca_sha256 = {KIT_PIN:?}\nsigned = true\n"
        ))),
        "policy: unknown key `workload.flare.signed` at line 12, column 1; expected one of startup_kit, root_ca_sha256, withheld"
    );
}

#[test]
fn the_flare_kit_is_never_overridable() {
    for key in [
        "workload.flare",
        "workload.flare.startup_kit",
        "workload.flare.root_ca_sha256",
        "workload.flare.withheld",
    ] {
        let error = error_of(&format!("overridable = [{key:?}]\n{MINIMAL}"));
        assert!(
            error.contains("decides what the VM trusts or runs"),
            "{key}: {error}"
        );
    }
}

// ---- [attestation.gpu] ----

fn gpu_policy(gpu: &str) -> String {
    format!(
        "{}\n[network]\n",
        minimal_with(
            "attestation = \"none\"",
            &format!("[attestation]\ntee = \"tpm\"\nkbs = \"https://kbs.example\"\nkbs_ca = \"/ca.pem\"\n\n[attestation.gpu]\n{gpu}\n")
        )
    )
}

#[test]
fn the_gpu_table_is_read_with_its_defaults() {
    let loaded = parse(&gpu_policy(""), None, &users()).unwrap();
    let Attestation::Broker { gpu: Some(gpu), .. } = &loaded.policy.attestation else {
        panic!("no gpu");
    };
    assert_eq!(
        **gpu,
        Gpu {
            required: true,
            count: None,
            arch: vec![],
            min_driver: None,
            min_vbios: None,
            allow_devtools: false,
            rims: vec![],
            simulate: None,
        }
    );
    let loaded = parse(
        &gpu_policy("required = true\ncount = 2\narch = [\"hopper\", \"blackwell\"]\nmin_driver = \"550.90.07\"\nmin_vbios = \"96.00.9F.00.01\"\nallow_devtools = true\nrims = [\"/etc/cvm-warden/rims/driver.xml\"]\nsimulate = \"/etc/cvm-warden/nvidia-sim/gpu.json\""),
        None,
        &users(),
    )
    .unwrap();
    let Attestation::Broker { gpu: Some(gpu), .. } = &loaded.policy.attestation else {
        panic!("no gpu");
    };
    assert_eq!(gpu.count, Some(2));
    assert_eq!(gpu.arch, [GpuArch::Hopper, GpuArch::Blackwell]);
    assert_eq!(gpu.min_driver.as_deref(), Some("550.90.07"));
    assert_eq!(gpu.min_vbios.as_deref(), Some("96.00.9F.00.01"));
    assert!(gpu.allow_devtools);
    assert_eq!(gpu.rims, [PathBuf::from("/etc/cvm-warden/rims/driver.xml")]);
    assert_eq!(
        gpu.simulate.as_deref(),
        Some(std::path::Path::new("/etc/cvm-warden/nvidia-sim/gpu.json"))
    );
    // `policy check` and `plan` print it.
    let json = serde_json::to_value(&loaded.policy).unwrap();
    assert_eq!(
        json["attestation"]["gpu"]["arch"],
        serde_json::json!(["hopper", "blackwell"])
    );
}

#[test]
fn bad_gpu_settings_are_named_with_their_values() {
    assert_eq!(
        error_of(&gpu_policy(
            "required = false\ncount = 0\narch = [\"hopper\", \"ampere\"]\nmin_driver = \"550.9x\"\nmin_vbios = \"96..01\"\nrims = [\"rim.xml\"]\nsimulate = \"gpu.json\""
        )),
        "attestation.gpu.count: 0 is out of range; write the exact number of GPUs, from 1 to 64, or remove it\n\
         attestation.gpu.arch[1]: \"ampere\" is not a GPU architecture with confidential computing; write \"hopper\" or \"blackwell\"\n\
         attestation.gpu.min_driver: \"550.9x\" is not a version; write decimal numbers separated by dots, e.g. \"550.90.07\"\n\
         attestation.gpu.min_vbios: \"96..01\" is not a version; write hexadecimal numbers separated by dots, e.g. \"96.00.9f.00.01\"\n\
         attestation.gpu.rims[0]: \"rim.xml\" is not an absolute path; write the full path inside the image, e.g. \"/etc/cvm-warden/rims/driver.xml\"\n\
         attestation.gpu.simulate: \"gpu.json\" is not an absolute path; write the full path inside the image, e.g. \"/etc/cvm-warden/nvidia-sim/gpu.json\""
    );
    assert_eq!(
        error_of(&gpu_policy("required = false\ncount = 1")),
        "attestation.gpu.required: false contradicts count (which requires that many GPUs); remove one of them"
    );
    let error = error_of(&gpu_policy("cc = true"));
    assert!(
        error.contains("unknown key `attestation.gpu.cc`"),
        "{error}"
    );
}

#[test]
fn the_gpu_requirements_are_never_overridable() {
    let policy = format!("overridable = [\"attestation.gpu\"]\n{}", gpu_policy(""));
    let error = error_of(&policy);
    assert!(
        error.contains("overridable[0]: \"attestation.gpu\" decides what the VM trusts or runs"),
        "{error}"
    );
}

#[test]
fn reattest_keys_default_to_ten_minutes_and_are_checked() {
    let with = |table: &str| {
        let policy = minimal_with(
            "attestation = \"none\"",
            &format!("attestation = {{ tee = \"tpm\", kbs = \"https://kbs.example\", kbs_ca = \"/ca.pem\"{table} }}"),
        );
        format!("{policy}\n[network]\n")
    };
    let reattest = |table: &str| match parse(&with(table), None, &users()) {
        Ok(loaded) => match loaded.policy.attestation {
            Attestation::Broker { reattest, .. } => Ok(reattest),
            Attestation::None => panic!("not a broker"),
        },
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(reattest("").unwrap(), default_reattest());
    // A short interval gets half of it as the default grace.
    let short = reattest(", reattest_interval = \"60s\"").unwrap();
    assert_eq!(
        (
            short.interval_secs,
            short.grace_secs,
            short.interval_explicit
        ),
        (60, 30, true)
    );
    let off = reattest(", reattest_interval = \"0\"").unwrap();
    assert_eq!((off.interval_secs, off.interval_explicit), (0, true));
    let full = reattest(", reattest_interval = \"5m\", reattest_grace = \"0\", reattest_resource = \"kbs:///a/b/c\"").unwrap();
    assert_eq!((full.interval_secs, full.grace_secs), (300, 0));
    assert_eq!(full.resource.unwrap().to_string(), "kbs:///a/b/c");
    for (table, error) in [
        (", reattest_interval = \"2s\"", "attestation.reattest_interval: \"2s\" is not a duration from 5s to 24h"),
        (", reattest_interval = \"often\"", "attestation.reattest_interval: \"often\" is not a duration"),
        (", reattest_grace = \"forever\"", "attestation.reattest_grace: \"forever\" is not a duration"),
        (", reattest_interval = \"60s\", reattest_grace = \"60s\"", "attestation.reattest_grace: \"60s\" is not shorter than attestation.reattest_interval (60s)"),
        (", reattest_grace = \"15m\"", "attestation.reattest_grace: \"15m\" is not shorter than attestation.reattest_interval (600s)"),
        (", reattest_resource = \"https://x/y\"", "attestation.reattest_resource: "),
        (", reattest_interval = \"0\", reattest_resource = \"kbs:///a/b/c\"", "attestation.reattest_resource: is set but attestation.reattest_interval = \"0\""),
    ] {
        let got = reattest(table).unwrap_err();
        assert!(got.contains(error), "{table}: {got}");
    }
}
