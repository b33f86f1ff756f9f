//! Unit tests of the lockdown against a temporary directory tree standing in for `/proc`,
//! `/sys`, `/etc`, `/run` and `/lib/modules`; system calls and commands go to
//! [`FakeLockdownSys`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::*;
use crate::policy::Lockdown;

const RELEASE: &str = "6.1.0-test";

/// A fake root with an unhardened kernel: every sysctl at its default, one swap area, `/tmp`
/// on the root file system, no lockdown yet, root with a password, login shells.
struct Tree {
    _dir: tempfile::TempDir,
    paths: Paths,
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

impl Tree {
    fn new() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        for (key, value) in [
            ("kernel.kexec_load_disabled", "0"),
            ("kernel.dmesg_restrict", "0"),
            ("kernel.kptr_restrict", "0"),
            ("kernel.yama.ptrace_scope", "1"),
            ("kernel.unprivileged_bpf_disabled", "2"),
            ("kernel.sysrq", "176"),
            ("kernel.perf_event_paranoid", "2"),
            ("kernel.modules_disabled", "0"),
            ("kernel.ctrl-alt-del", "1"),
        ] {
            write(&paths.sysctl(key), &format!("{value}\n"));
        }
        write(
            &paths.proc_swaps,
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
             /dev/vda2                               partition\t1048572\t\t0\t\t-2\n\
             /swap\\040file                           file\t\t4096\t\t0\t\t-3\n",
        );
        write(
            &paths.mountinfo,
            "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
             23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw\n",
        );
        fs::create_dir_all(&paths.proc_self_fd).unwrap();
        std::os::unix::fs::symlink("/dev/pts/0", paths.proc_self_fd.join("0")).unwrap();
        let modules = paths.lib_modules.join(RELEASE);
        write(
            &modules.join("modules.dep"),
            "kernel/drivers/md/dm-mod.ko.zst:\n\
             kernel/drivers/md/dm-crypt.ko.zst: kernel/drivers/md/dm-mod.ko.zst kernel/crypto/ecb.ko\n\
             kernel/crypto/ecb.ko:\n\
             kernel/net/vsock/vsock.ko.xz:\n\
             kernel/drivers/virtio/virtio_rng.ko:\n",
        );
        write(
            &modules.join("modules.builtin"),
            "kernel/crypto/sha256_generic.ko\n",
        );
        for file in [
            "kernel/drivers/md/dm-mod.ko.zst",
            "kernel/drivers/md/dm-crypt.ko.zst",
            "kernel/crypto/ecb.ko",
            "kernel/net/vsock/vsock.ko.xz",
            "kernel/drivers/virtio/virtio_rng.ko",
        ] {
            write(&modules.join(file), "module bytes");
        }
        write(&paths.sys_module.join("compression"), "zstd\n");
        write(&paths.lockdown(), "[none] integrity confidentiality\n");
        write(
            &paths.passwd,
            "root:x:0:0:root:/root:/bin/bash\n\
             daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
             sync:x:4:65534:sync:/bin:/bin/sync\n\
             # a comment\n\
             fl:x:1000:1000::/home/fl:\n",
        );
        write(
            &paths.shadow,
            "root:$6$salt$hash:19000:0:99999:7:::\n\
             daemon:*:19000:0:99999:7:::\n",
        );
        fs::set_permissions(&paths.shadow, fs::Permissions::from_mode(0o640)).unwrap();
        write(&paths.dev_null, "");
        write(&paths.console, "");
        fs::create_dir_all(&paths.tmp).unwrap();
        Tree { _dir: dir, paths }
    }

    fn sysctl(&self, key: &str) -> String {
        fs::read_to_string(self.paths.sysctl(key))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn kernel(&self) -> FakeLockdownSys {
        FakeLockdownSys::new(RELEASE).with_kernel(&self.paths)
    }
}

fn policy(kernel_lockdown: Option<&str>, modules: &[&str]) -> Lockdown {
    Lockdown {
        consoles: "off".to_owned(),
        kernel_lockdown: kernel_lockdown.map(str::to_owned),
        modules: modules.iter().map(|m| (*m).to_owned()).collect(),
    }
}

fn outcome_of<'a>(report: &'a Report, setting: &str) -> &'a Outcome {
    &report
        .steps
        .iter()
        .find(|s| s.setting == setting)
        .unwrap_or_else(|| panic!("no step {setting} in {:#?}", report.steps))
        .outcome
}

fn mismatches(error: LockdownError) -> Vec<String> {
    match error {
        LockdownError::NotApplied(list) => list.iter().map(Mismatch::to_string).collect(),
        other => panic!("expected NotApplied, got {other:?}"),
    }
}

// --- plan -----------------------------------------------------------------------------------

#[test]
fn pid1_plan_closes_console_and_accounts_and_masks_nothing() {
    let plan = plan(&policy(Some("integrity"), &["dm_crypt"]), Shape::Pid1);
    assert!(plan.console_receiver_off && plan.lock_root && plan.nologin_shells);
    assert!(plan.masks.is_empty() && !plan.stop_units && !plan.end_sessions);
    assert!(plan.disable_ctrl_alt_del && plan.close_stdin && plan.swap_off && plan.tmp_tmpfs);
    assert_eq!(plan.modules, ["dm_crypt"]);
    assert_eq!(plan.kernel_lockdown.as_deref(), Some("integrity"));
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["shape"], "pid1");
    assert_eq!(json["sysctls"][7]["key"], "kernel.modules_disabled");
}

#[test]
fn systemd_plan_masks_gettys_shells_and_ssh_and_ends_sessions() {
    let plan = plan(&policy(None, &[]), Shape::Systemd);
    for unit in [
        "getty@.service",
        "serial-getty@.service",
        "console-getty.service",
        "container-getty@.service",
        "debug-shell.service",
        "ssh.service",
        "sshd.service",
        "ctrl-alt-del.target",
    ] {
        assert!(plan.masks.iter().any(|m| m == unit), "{unit} not masked");
    }
    assert!(plan.stop_units && plan.end_sessions);
    assert!(!plan.lock_root && !plan.nologin_shells && !plan.console_receiver_off);
}

#[test]
fn modules_disabled_is_the_last_sysctl_and_yama_alone_is_optional() {
    assert_eq!(SYSCTLS.last().unwrap().key, "kernel.modules_disabled");
    let optional: Vec<_> = SYSCTLS.iter().filter(|s| s.optional.is_some()).collect();
    assert_eq!(optional.len(), 1);
    assert_eq!(optional[0].key, "kernel.yama.ptrace_scope");
}

// --- apply, PID 1 shape, end to end ----------------------------------------------------------

#[test]
fn pid1_lockdown_applies_every_setting_and_the_self_check_passes() {
    let tree = Tree::new();
    write(&tree.paths.lockdown(), "none [integrity] confidentiality\n");
    let sys = tree.kernel();
    let plan = plan(&policy(Some("integrity"), &["dm-crypt"]), Shape::Pid1);
    let report = apply(&plan, &sys, &tree.paths).unwrap();

    for sysctl in SYSCTLS {
        assert_eq!(tree.sysctl(sysctl.key), sysctl.value, "{}", sysctl.key);
    }
    let modules = tree.paths.lib_modules.join(RELEASE);
    assert_eq!(
        sys.calls(),
        vec![
            // dependencies first, in reverse modules.dep order, compressed ones decompressed
            // by the kernel
            LockdownCall::FinitModule {
                path: modules.join("kernel/crypto/ecb.ko"),
                compressed: false
            },
            LockdownCall::FinitModule {
                path: modules.join("kernel/drivers/md/dm-mod.ko.zst"),
                compressed: true
            },
            LockdownCall::FinitModule {
                path: modules.join("kernel/drivers/md/dm-crypt.ko.zst"),
                compressed: true
            },
            LockdownCall::Swapoff(PathBuf::from("/dev/vda2")),
            LockdownCall::Swapoff(PathBuf::from("/swap file")),
            LockdownCall::Mount {
                source: Some("tmpfs".into()),
                target: tree.paths.tmp.clone(),
                fstype: Some("tmpfs".into()),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                data: Some("mode=1777".into()),
            },
            LockdownCall::DisableCtrlAltDel,
            LockdownCall::StdinToNull(tree.paths.dev_null.clone()),
            LockdownCall::ConsoleReceiverOff(tree.paths.console.clone()),
        ]
    );
    // Module steps come before the sysctls, kernel.modules_disabled is the last sysctl.
    let settings: Vec<&str> = report.steps.iter().map(|s| s.setting.as_str()).collect();
    let module_at = settings
        .iter()
        .position(|s| *s == "module dm-crypt")
        .unwrap();
    let disabled_at = settings
        .iter()
        .position(|s| *s == "kernel.modules_disabled")
        .unwrap();
    assert!(
        module_at
            < settings
                .iter()
                .position(|s| s.starts_with("kernel."))
                .unwrap()
    );
    assert_eq!(settings[disabled_at - 1], "kernel.perf_event_paranoid");
    assert_eq!(outcome_of(&report, "kernel lockdown"), &Outcome::AlreadySet);

    // Accounts: root locked (hash kept, mode kept), every login shell nologin.
    let shadow = fs::read_to_string(&tree.paths.shadow).unwrap();
    assert!(shadow.starts_with("root:!$6$salt$hash:19000:"), "{shadow}");
    assert!(shadow.contains("daemon:*:19000"));
    assert_eq!(
        fs::metadata(&tree.paths.shadow)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o640
    );
    let passwd = fs::read_to_string(&tree.paths.passwd).unwrap();
    assert_eq!(
        passwd,
        "root:x:0:0:root:/root:/usr/sbin/nologin\n\
         daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
         sync:x:4:65534:sync:/bin:/usr/sbin/nologin\n\
         # a comment\n\
         fl:x:1000:1000::/home/fl:/usr/sbin/nologin\n"
    );
    assert_eq!(
        report
            .steps
            .iter()
            .find(|s| s.setting == "login shells")
            .unwrap()
            .value,
        "/usr/sbin/nologin for root,sync,fl"
    );
    assert!(
        report
            .checks
            .iter()
            .all(|c| matches!(c.state, CheckState::Ok)),
        "{:#?}",
        report.checks
    );
    assert_eq!(report.checks.len(), 1 + 8 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1);

    // Idempotent: a second run changes nothing and still passes.
    let again = apply(&plan, &sys, &tree.paths).unwrap();
    for step in &again.steps {
        if step.setting.starts_with("kernel.") || step.setting.starts_with("module") {
            assert_eq!(step.outcome, Outcome::AlreadySet, "{}", step.setting);
        }
    }
    assert_eq!(outcome_of(&again, "root password"), &Outcome::AlreadySet);
    assert_eq!(outcome_of(&again, "swap"), &Outcome::AlreadySet);
}

#[test]
fn a_kernel_that_ignores_the_calls_fails_the_self_check_naming_each_setting() {
    let tree = Tree::new();
    let sys = FakeLockdownSys::new(RELEASE); // records, but no effect shows up anywhere
    let error = apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap_err();
    let tmp = tree.paths.tmp.display();
    let console = tree.paths.console.display();
    let null = tree.paths.dev_null.display();
    assert_eq!(
        mismatches(error),
        vec![
            "swap wanted none, actual /dev/vda2,/swap file".to_owned(),
            format!("{tmp} wanted tmpfs,nosuid,nodev, actual not a mount point"),
            "kernel.ctrl-alt-del wanted 0, actual 1".to_owned(),
            format!("stdin wanted {null}, actual /dev/pts/0"),
            format!("{console} input wanted off, actual on (CREAD)"),
        ]
    );
}

#[test]
fn a_sysctl_that_reads_back_otherwise_fails_closed_with_wanted_and_actual() {
    let tree = Tree::new();
    let sys = tree.kernel();
    let plan = plan(&policy(None, &[]), Shape::Pid1);
    apply(&plan, &sys, &tree.paths).unwrap();
    // Something (a kernel that clamps the value, another process) changes it afterwards.
    write(&tree.paths.sysctl("kernel.perf_event_paranoid"), "2\n");
    let error = self_check(&plan, &sys, &tree.paths).unwrap_err();
    let text = error.to_string();
    assert_eq!(
        mismatches(error),
        ["kernel.perf_event_paranoid wanted 3, actual 2"]
    );
    assert!(
        text.starts_with(
            "lockdown did not stick: kernel.perf_event_paranoid wanted 3, actual 2; hint:"
        ),
        "{text}"
    );
}

#[test]
fn missing_yama_is_recorded_as_not_available() {
    let tree = Tree::new();
    fs::remove_dir_all(tree.paths.proc_sys.join("kernel/yama")).unwrap();
    let report = apply(
        &plan(&policy(None, &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap();
    assert!(matches!(
        outcome_of(&report, "kernel.yama.ptrace_scope"),
        Outcome::NotAvailable { reason } if reason.contains("Yama")
    ));
    let check = report
        .checks
        .iter()
        .find(|c| c.setting == "kernel.yama.ptrace_scope")
        .unwrap();
    assert_eq!(check.state, CheckState::NotAvailable);
}

#[test]
fn a_missing_required_sysctl_fails_closed() {
    let tree = Tree::new();
    fs::remove_file(tree.paths.sysctl("kernel.kexec_load_disabled")).unwrap();
    let error = apply(
        &plan(&policy(None, &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap_err();
    assert!(
        matches!(&error, LockdownError::SysctlMissing { key, .. } if key == "kernel.kexec_load_disabled")
    );
    assert!(
        error.to_string().contains("cannot be set to 1; hint:"),
        "{error}"
    );
}

#[test]
fn a_sysctl_write_error_names_the_key_and_value() {
    let tree = Tree::new();
    let path = tree.paths.sysctl("kernel.kptr_restrict");
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap(); // readable as "not a file", not writable
    let error = apply(
        &plan(&policy(None, &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap_err();
    // A directory cannot be read as text either: reading it is what fails first.
    assert!(
        matches!(&error, LockdownError::Read { path: p, .. } if *p == path)
            || matches!(&error, LockdownError::SysctlWrite { key, .. } if key == "kernel.kptr_restrict"),
        "{error:?}"
    );
}

// --- modules --------------------------------------------------------------------------------

#[test]
fn a_missing_module_fails_closed_before_anything_is_loaded() {
    let tree = Tree::new();
    let sys = tree.kernel();
    let error = apply(
        &plan(&policy(None, &["dm_crypt", "nvidia"]), Shape::Pid1),
        &sys,
        &tree.paths,
    )
    .unwrap_err();
    assert!(sys.calls().is_empty(), "{:?}", sys.calls());
    assert_eq!(tree.sysctl("kernel.modules_disabled"), "0");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "kernel module nvidia (needed by lockdown.modules) is not loaded, not built in and not in {}; hint:",
            tree.paths
                .lib_modules
                .join(RELEASE)
                .join("modules.dep")
                .display()
        )),
        "{text}"
    );
}

#[test]
fn loaded_and_builtin_modules_are_not_loaded_again() {
    let tree = Tree::new();
    fs::create_dir_all(tree.paths.sys_module.join("virtio_rng")).unwrap();
    let sys = tree.kernel();
    let report = apply(
        &plan(
            &policy(None, &["virtio-rng", "sha256_generic"]),
            Shape::Pid1,
        ),
        &sys,
        &tree.paths,
    )
    .unwrap();
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, LockdownCall::FinitModule { .. })));
    assert_eq!(
        outcome_of(&report, "module virtio-rng"),
        &Outcome::AlreadySet
    );
    assert_eq!(
        outcome_of(&report, "module sha256_generic"),
        &Outcome::AlreadySet
    );
}

#[test]
fn eexist_from_finit_module_counts_as_loaded() {
    let tree = Tree::new();
    let sys = FakeLockdownSys::new(RELEASE).with_kernel(&tree.paths);
    sys.fail("finit_module", libc::EEXIST);
    let result = apply(
        &plan(&policy(None, &["virtio_rng"]), Shape::Pid1),
        &sys,
        &tree.paths,
    );
    // finit_module answered EEXIST: not an error; the self-check then decides from /sys.
    assert_eq!(
        mismatches(result.unwrap_err()),
        ["module virtio_rng wanted loaded, actual not loaded"]
    );
    assert_eq!(tree.sysctl("kernel.modules_disabled"), "1");
}

#[test]
fn a_failed_load_stops_before_module_loading_is_disabled() {
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.fail("finit_module", libc::ENOKEY);
    let error = apply(
        &plan(&policy(None, &["virtio_rng"]), Shape::Pid1),
        &sys,
        &tree.paths,
    )
    .unwrap_err();
    assert!(
        matches!(&error, LockdownError::ModuleLoad { module, compressed: false, .. } if module == "virtio_rng")
    );
    assert!(error
        .to_string()
        .contains("signed when the kernel enforces signatures"));
    assert_eq!(tree.sysctl("kernel.modules_disabled"), "0");
    assert_eq!(tree.sysctl("kernel.sysrq"), "176");
}

#[test]
fn a_module_compressed_in_a_format_the_kernel_lacks_fails_closed() {
    let tree = Tree::new();
    let sys = tree.kernel();
    let error = apply(
        &plan(&policy(None, &["vsock"]), Shape::Pid1),
        &sys,
        &tree.paths,
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "kernel module vsock ({}) is xz-compressed but the kernel decompresses only zstd; \
             hint: ship it uncompressed or compressed as the kernel's CONFIG_MODULE_DECOMPRESS expects",
            tree.paths.lib_modules.join(RELEASE).join("kernel/net/vsock/vsock.ko.xz").display()
        )
    );
    assert!(sys.calls().is_empty());
}

#[test]
fn modules_cannot_be_loaded_once_loading_is_disabled() {
    let tree = Tree::new();
    write(&tree.paths.sysctl("kernel.modules_disabled"), "1\n");
    let sys = tree.kernel();
    let error = apply(
        &plan(&policy(None, &["dm_crypt"]), Shape::Pid1),
        &sys,
        &tree.paths,
    )
    .unwrap_err();
    assert!(
        matches!(&error, LockdownError::ModulesAlreadyDisabled { modules } if modules == &["dm_crypt", "dm_mod", "ecb"]),
        "{error:?}"
    );
    assert!(sys.calls().is_empty());
}

#[test]
fn module_names_treat_dash_and_underscore_alike_and_strip_compression() {
    assert_eq!(module_name("kernel/drivers/md/dm-crypt.ko.zst"), "dm_crypt");
    assert_eq!(module_name("dm-crypt"), "dm_crypt");
    assert_eq!(module_name("virtio_rng.ko"), "virtio_rng");
    let index = ModuleIndex::parse(
        Path::new("/m"),
        "a.ko: /abs/b.ko.xz c-d.ko\nbroken line\n",
        "",
    );
    assert_eq!(
        index.load_order("a").unwrap(),
        vec![
            ("c_d".to_owned(), PathBuf::from("/m/c-d.ko")),
            ("b".to_owned(), PathBuf::from("/abs/b.ko.xz")),
            ("a".to_owned(), PathBuf::from("/m/a.ko")),
        ]
    );
    assert!(index.load_order("e").is_none());
}

#[test]
fn soft_dependencies_load_first_through_their_aliases() {
    // Debian 6.1's files: libcrc32c's init asks the crypto API for "crc32c" and fails with
    // ENOENT unless an implementation is loaded before it.
    let index = ModuleIndex::parse(
        Path::new("/m"),
        "kernel/net/netfilter/nf_tables.ko: kernel/lib/libcrc32c.ko kernel/net/netfilter/nfnetlink.ko\n\
         kernel/lib/libcrc32c.ko:\n\
         kernel/net/netfilter/nfnetlink.ko:\n\
         kernel/crypto/crc32c_generic.ko:\n\
         kernel/arch/x86/crypto/crc32c-intel.ko:\n",
        "",
    )
    .with_softdeps(
        "softdep libcrc32c pre: crc32c\nsoftdep ext4 pre: crypto-crc32c\nsoftdep x pre: absent\n",
        "alias crypto-crc32c crc32c_intel\nalias crc32c crc32c_intel\nalias crc32c crc32c_generic\n",
    );
    let names: Vec<String> = index
        .load_order("nf_tables")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "nfnetlink",
            "crc32c_intel",
            "crc32c_generic",
            "libcrc32c",
            "nf_tables"
        ]
    );
    assert_eq!(
        index.soft_dependencies().into_iter().collect::<Vec<_>>(),
        ["crc32c_generic", "crc32c_intel"]
    );
    // Without the softdep files the order is modules.dep's alone.
    let plain = ModuleIndex::parse(Path::new("/m"), "a.ko: b.ko\nb.ko:\n", "");
    assert_eq!(plain.load_order("a").unwrap().len(), 2);
}

// --- lockdown LSM -----------------------------------------------------------------------------

#[test]
fn the_lockdown_mode_is_written_and_read_back_from_the_brackets() {
    let tree = Tree::new();
    // The tree's file is not a kernel: after the write it holds exactly what was written,
    // without brackets, so the read-back (which wants `[mode]`) reports it.
    let error = apply(
        &plan(&policy(Some("confidentiality"), &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap_err();
    assert_eq!(
        fs::read_to_string(tree.paths.lockdown()).unwrap(),
        "confidentiality"
    );
    assert_eq!(
        mismatches(error),
        ["kernel lockdown wanted confidentiality, actual unreadable \"confidentiality\""]
    );
    assert_eq!(
        parse_lockdown("none integrity [confidentiality]\n"),
        Some("confidentiality")
    );
    assert_eq!(parse_lockdown("none integrity"), None);
}

#[test]
fn a_stricter_lockdown_mode_already_active_satisfies_the_policy() {
    let tree = Tree::new();
    write(&tree.paths.lockdown(), "none integrity [confidentiality]\n");
    let report = apply(
        &plan(&policy(Some("integrity"), &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap();
    let step = report
        .steps
        .iter()
        .find(|s| s.setting == "kernel lockdown")
        .unwrap();
    assert_eq!(
        (step.value.as_str(), &step.outcome),
        ("confidentiality", &Outcome::AlreadySet)
    );
}

#[test]
fn no_lockdown_lsm_fails_closed_when_a_mode_is_asked_for() {
    let tree = Tree::new();
    fs::remove_file(tree.paths.lockdown()).unwrap();
    let sys = tree.kernel();
    let error = apply(
        &plan(&policy(Some("integrity"), &[]), Shape::Pid1),
        &sys,
        &tree.paths,
    )
    .unwrap_err();
    // securityfs was not in the mount table, so it was mounted first.
    assert_eq!(
        sys.calls()[0],
        LockdownCall::Mount {
            source: Some("securityfs".into()),
            target: tree.paths.securityfs.clone(),
            fstype: Some("securityfs".into()),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            data: None,
        }
    );
    assert!(error.to_string().starts_with(
        "lockdown.kernel_lockdown = \"integrity\" but the kernel has no lockdown LSM"
    ));
    // "none" asks for nothing, so the absent LSM is fine.
    apply(
        &plan(&policy(Some("none"), &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap();
}

// --- swap, /tmp -------------------------------------------------------------------------------

#[test]
fn a_failing_swapoff_names_the_swap_area() {
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.fail("swapoff", libc::ENOMEM);
    let error = apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap_err();
    assert!(error
        .to_string()
        .starts_with("turn swap off on /dev/vda2 (swapoff); hint:"));
}

#[test]
fn a_tmpfs_without_nosuid_nodev_is_remounted_keeping_its_other_flags() {
    let tree = Tree::new();
    let line = format!(
        "30 22 0:30 / {} rw,noexec,relatime shared:5 - tmpfs tmpfs rw\n",
        tree.paths.tmp.display()
    );
    let mut table = fs::read_to_string(&tree.paths.mountinfo).unwrap();
    table.push_str(&line);
    write(&tree.paths.mountinfo, &table);
    let sys = tree.kernel();
    apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap();
    assert!(sys.calls().contains(&LockdownCall::Mount {
        source: None,
        target: tree.paths.tmp.clone(),
        fstype: None,
        flags: MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        data: None,
    }));
}

#[test]
fn a_hardened_tmpfs_on_tmp_is_left_alone() {
    let tree = Tree::new();
    let mut table = fs::read_to_string(&tree.paths.mountinfo).unwrap();
    table.push_str(&format!(
        "30 22 0:30 / {} rw,nosuid,nodev shared:5 - tmpfs tmpfs rw\n",
        tree.paths.tmp.display()
    ));
    write(&tree.paths.mountinfo, &table);
    let sys = tree.kernel();
    apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap();
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, LockdownCall::Mount { .. })));
}

// --- consoles and accounts --------------------------------------------------------------------

#[test]
fn failures_of_ctrl_alt_del_and_stdin_are_errors_with_hints() {
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.fail("disable_ctrl_alt_del", libc::EINVAL);
    let error = apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap_err();
    assert_eq!(
        error.to_string(),
        "disable Ctrl-Alt-Del (reboot RB_DISABLE_CAD); hint: needs CAP_SYS_BOOT in the initial PID namespace"
    );
    let sys = tree.kernel();
    sys.fail("stdin_to_null", libc::ENOENT);
    let error = apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap_err();
    assert!(matches!(error, LockdownError::Stdin { .. }));
}

#[test]
fn a_console_that_is_no_terminal_or_absent_is_recorded_not_failed() {
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.set_console(None);
    let report = apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap();
    let setting = format!("{} input", tree.paths.console.display());
    assert!(matches!(
        outcome_of(&report, &setting),
        Outcome::NotAvailable { .. }
    ));
    let sys = tree.kernel();
    sys.fail("console_receiver_off", libc::ENXIO);
    let report = apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap();
    assert!(
        matches!(outcome_of(&report, &setting), Outcome::NotAvailable { reason } if reason == "there is no console device")
    );
    let sys = tree.kernel();
    sys.fail("console_receiver_off", libc::EIO);
    let error = apply(&plan(&policy(None, &[]), Shape::Pid1), &sys, &tree.paths).unwrap_err();
    assert!(matches!(error, LockdownError::ConsoleInput { .. }));
}

#[test]
fn root_is_locked_with_a_bang_once() {
    assert_eq!(
        lock_root_password("root:$y$x:1::::::\nfl:!:1::::::\n")
            .unwrap()
            .unwrap(),
        "root:!$y$x:1::::::\nfl:!:1::::::\n"
    );
    assert_eq!(
        lock_root_password("root:::::::").unwrap().unwrap(),
        "root:!::::::"
    );
    assert_eq!(
        lock_root_password("root:*:1::::::").unwrap().unwrap(),
        "root:!*:1::::::"
    );
    assert_eq!(lock_root_password("root:!$y$x:1::::::\n").unwrap(), None);
    assert_eq!(lock_root_password("fl:$y$x:1::::::\n").unwrap(), None);
    assert_eq!(
        lock_root_password("root:a:::\nroot:b:::\n").unwrap_err(),
        "root is listed twice"
    );
}

#[test]
fn a_root_hash_in_passwd_is_locked_too() {
    let (text, changed) = nologin_shells("root:$1$abc:0:0::/root:/usr/sbin/nologin\n");
    assert_eq!(text, "root:!$1$abc:0:0::/root:/usr/sbin/nologin\n");
    assert_eq!(changed, ["root"]);
    let (_, changed) = nologin_shells("daemon:x:1:1::/:/bin/false\n");
    assert!(changed.is_empty());
}

#[test]
fn a_duplicated_root_in_shadow_is_refused() {
    let tree = Tree::new();
    write(&tree.paths.shadow, "root:a:1::::::\nroot:b:1::::::\n");
    let error = apply(
        &plan(&policy(None, &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap_err();
    assert!(error.to_string().ends_with(
        "cannot be edited safely: root is listed twice; hint: fix the file in the image"
    ));
}

#[test]
fn absent_account_files_are_skipped_with_the_reason() {
    let tree = Tree::new();
    fs::remove_file(&tree.paths.shadow).unwrap();
    fs::remove_file(&tree.paths.passwd).unwrap();
    let report = apply(
        &plan(&policy(None, &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap();
    assert!(
        matches!(outcome_of(&report, "root password"), Outcome::Skipped { reason } if reason.ends_with("shadow is absent"))
    );
    assert!(matches!(
        outcome_of(&report, "login shells"),
        Outcome::Skipped { .. }
    ));
}

#[test]
fn an_account_file_that_is_a_symlink_is_not_followed() {
    let tree = Tree::new();
    let real = tree.paths.shadow.with_file_name("shadow.real");
    fs::rename(&tree.paths.shadow, &real).unwrap();
    std::os::unix::fs::symlink(&real, &tree.paths.shadow).unwrap();
    let error = apply(
        &plan(&policy(None, &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap_err();
    assert!(
        matches!(error, LockdownError::AccountWrite { .. }),
        "{error:?}"
    );
    assert!(fs::read_to_string(&real).unwrap().starts_with("root:$6$"));
}

// --- systemd shape ------------------------------------------------------------------------------

fn out(stdout: &str) -> io::Result<CommandOutput> {
    Ok(CommandOutput {
        code: Some(0),
        stdout: stdout.to_owned(),
        stderr: String::new(),
    })
}

fn run_lines(sys: &FakeLockdownSys) -> Vec<String> {
    sys.calls()
        .into_iter()
        .filter_map(|c| match c {
            LockdownCall::Run(argv) => Some(argv.join(" ")),
            _ => None,
        })
        .collect()
}

#[test]
fn systemd_shape_masks_stops_and_ends_sessions_then_reads_them_back() {
    let tree = Tree::new();
    // An old unit file in system.control is replaced by the mask.
    write(
        &tree.paths.systemd_control.join("ssh.service"),
        "[Service]\n",
    );
    let sys = tree.kernel();
    sys.script(
        &["systemctl", "list-units"],
        vec![
            out("getty@tty1.service loaded active running Getty on tty1\n\
                 ● sshd.service loaded active running OpenSSH\n\
                 ssh@3-10.0.0.2:22-10.0.0.9:51000.service loaded active running OpenBSD Secure Shell server per-connection daemon\n"),
            out(""),
        ],
    );
    sys.script(
        &["loginctl", "list-sessions"],
        vec![
            out("3 0 root - tty1 active no -\nc1 1000 fl - - closing no -\n"),
            out("c1 1000 fl\n"),
            out(""),
        ],
    );
    let report = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap();
    for unit in MASKED_UNITS {
        assert_eq!(
            fs::read_link(tree.paths.systemd_control.join(unit)).unwrap(),
            Path::new("/dev/null"),
            "{unit}"
        );
        // Nothing goes to /run/systemd/system, which /etc/systemd/system outranks.
        assert!(!tree.paths.systemd_runtime.join(unit).exists(), "{unit}");
    }
    assert_eq!(
        fs::read_to_string(&tree.paths.manager_conf).unwrap(),
        "# Written by cvm-warden: no reboot from the console, however often Ctrl-Alt-Del is \
         pressed.\n[Manager]\nCtrlAltDelBurstAction=none\n"
    );
    let lines = run_lines(&sys);
    // The manager still has the default burst action: re-executed (which reloads the units
    // too), then asked until it answers `none`.
    assert_eq!(
        &lines[..3],
        [
            "systemctl show -p CtrlAltDelBurstAction --value",
            "systemctl daemon-reexec",
            "systemctl show -p CtrlAltDelBurstAction --value",
        ]
    );
    assert!(!lines.contains(&"systemctl daemon-reload".to_owned()));
    assert!(lines[3].starts_with(
        "systemctl list-units --plain --no-legend --full --state=active,activating,reloading -- getty@*.service serial-getty@*.service"
    ), "{}", lines[3]);
    assert!(
        lines[3].contains(" ssh@*.service sshd@*.service "),
        "{}",
        lines[3]
    );
    assert_eq!(
        lines[4],
        "systemctl stop -- getty@tty1.service sshd.service ssh@3-10.0.0.2:22-10.0.0.9:51000.service"
    );
    assert_eq!(
        &lines[5..10],
        [
            "loginctl list-sessions --no-legend",
            "loginctl terminate-session 3",
            "loginctl terminate-session c1",
            "loginctl list-sessions --no-legend",
            "loginctl list-sessions --no-legend",
        ]
    );
    assert_eq!(
        report
            .steps
            .iter()
            .find(|s| s.setting == "login sessions")
            .unwrap()
            .value,
        "ended 3,c1"
    );
    // Nothing of the PID 1 shape's account editing happens under systemd.
    assert!(fs::read_to_string(&tree.paths.shadow)
        .unwrap()
        .starts_with("root:$6$"));
    let check_of = |setting: &str| {
        report
            .checks
            .iter()
            .find(|c| c.setting == setting)
            .unwrap_or_else(|| panic!("no check {setting}"))
            .clone()
    };
    let getty = check_of("mask getty@.service");
    assert_eq!(getty.state, CheckState::Ok);
    assert_eq!(getty.actual, "/dev/null, getty@tty1.service masked");
    assert_eq!(
        check_of("mask serial-getty@.service").actual,
        "/dev/null, serial-getty@ttyS0.service masked"
    );
    assert_eq!(check_of("mask sshd@.service").state, CheckState::Ok);
    assert_eq!(check_of("systemd CtrlAltDelBurstAction").actual, "none");
    assert_eq!(
        check_of(&tree.paths.manager_conf.display().to_string()).state,
        CheckState::Ok
    );
    for unit in MASKED_UNITS {
        let probe = load_state_probe(unit);
        assert!(
            lines.contains(&format!("systemctl show -p LoadState --value {probe}")),
            "{unit} not asked of systemd"
        );
    }
}

#[test]
fn template_units_are_checked_through_an_instance() {
    assert_eq!(load_state_probe("getty@.service"), "getty@tty1.service");
    assert_eq!(load_state_probe("autovt@.service"), "autovt@tty1.service");
    assert_eq!(
        load_state_probe("serial-getty@.service"),
        "serial-getty@ttyS0.service"
    );
    assert_eq!(load_state_probe("ssh@.service"), "ssh@0.service");
    assert_eq!(load_state_probe("sshd.socket"), "sshd.socket");
    assert!(MASKED_UNITS.contains(&"ssh@.service") && MASKED_UNITS.contains(&"sshd@.service"));
}

#[test]
fn a_unit_file_that_outranks_the_mask_fails_the_self_check() {
    // The link is in place, but systemd loads sshd.service from a directory ranked higher
    // (or never read the mask): its LoadState is not `masked`.
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.script(
        &[
            "systemctl",
            "show",
            "-p",
            "LoadState",
            "--value",
            "sshd.service",
        ],
        vec![out("loaded\n")],
    );
    let error = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap_err();
    assert_eq!(
        mismatches(error),
        ["mask sshd.service wanted /dev/null, sshd.service masked, actual /dev/null, sshd.service loaded"]
    );
    assert_eq!(
        fs::read_link(tree.paths.systemd_control.join("sshd.service")).unwrap(),
        Path::new("/dev/null")
    );
}

#[test]
fn masks_systemd_never_reloaded_fail_the_self_check() {
    // A daemon-reload that reports success but loads nothing: every LoadState stays `loaded`.
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.script(&["systemctl", "daemon-reload"], vec![out("")]);
    sys.script(
        &["systemctl", "show", "-p", "CtrlAltDelBurstAction"],
        vec![out("none\n")],
    );
    let error = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap_err();
    let list = mismatches(error);
    assert_eq!(list.len(), MASKED_UNITS.len(), "{list:#?}");
    assert!(list.contains(
        &"mask getty@.service wanted /dev/null, getty@tty1.service masked, actual /dev/null, getty@tty1.service loaded"
            .to_owned()
    ));
    // The manager already had the burst off: no re-execution, a reload for the masks.
    let lines = run_lines(&sys);
    assert!(lines.contains(&"systemctl daemon-reload".to_owned()));
    assert!(!lines.contains(&"systemctl daemon-reexec".to_owned()));
}

#[test]
fn a_burst_action_the_manager_does_not_take_fails_the_self_check() {
    // Another drop-in (or an /etc file of the same name) overrides ours: after the
    // re-execution the manager still reboots on a burst.
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.script(
        &["systemctl", "show", "-p", "CtrlAltDelBurstAction"],
        vec![out("reboot-force\n")],
    );
    let error = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap_err();
    assert_eq!(
        mismatches(error),
        ["systemd CtrlAltDelBurstAction wanted none, actual reboot-force"]
    );
    let lines = run_lines(&sys);
    assert_eq!(lines[1], "systemctl daemon-reexec");
    // Asked once before, then polled (bounded) after the re-execution.
    let polls = lines
        .iter()
        .filter(|l| *l == "systemctl show -p CtrlAltDelBurstAction --value")
        .count();
    assert_eq!(polls, 1 + 20 + 1, "{lines:#?}");
}

#[test]
fn a_tampered_manager_drop_in_is_replaced_and_a_wrong_one_fails_the_check() {
    let tree = Tree::new();
    write(
        &tree.paths.manager_conf,
        "[Manager]\nCtrlAltDelBurstAction=reboot-force\n",
    );
    let sys = tree.kernel();
    let report = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap();
    assert_eq!(
        outcome_of(&report, "systemd CtrlAltDelBurstAction"),
        &Outcome::Applied
    );
    assert_eq!(
        fs::read_to_string(&tree.paths.manager_conf).unwrap(),
        MANAGER_CONF
    );
    // Changed behind our back after the lockdown: the self-check names the file.
    write(&tree.paths.manager_conf, "[Manager]\n");
    let error =
        self_check(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap_err();
    assert_eq!(
        mismatches(error),
        [format!(
            "{} wanted CtrlAltDelBurstAction=none, actual other content \"[Manager]\"",
            tree.paths.manager_conf.display()
        )]
    );
}

#[test]
fn the_manager_drop_in_is_left_alone_when_ctrl_alt_del_is_not_planned() {
    // A sandbox clears disable_ctrl_alt_del: systemd's configuration is not touched either.
    let tree = Tree::new();
    let sys = tree.kernel();
    let mut sandboxed = plan(&policy(None, &[]), Shape::Systemd);
    sandboxed.disable_ctrl_alt_del = false;
    assert!(!sandboxed.burst_action_off());
    apply(&sandboxed, &sys, &tree.paths).unwrap();
    assert!(!tree.paths.manager_conf.exists());
    let lines = run_lines(&sys);
    assert_eq!(lines[0], "systemctl daemon-reload");
    assert!(!lines.iter().any(|l| l.contains("CtrlAltDelBurstAction")));
    assert!(!plan(&policy(None, &[]), Shape::Pid1).burst_action_off());
}

#[test]
fn a_unit_still_running_after_stop_fails_the_self_check() {
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.script(
        &["systemctl", "list-units"],
        vec![out("serial-getty@ttyS0.service loaded active running x\n")],
    );
    let error = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap_err();
    assert_eq!(
        mismatches(error),
        ["running gettys and ssh wanted none, actual serial-getty@ttyS0.service"]
    );
}

#[test]
fn a_session_that_will_not_close_is_killed_and_then_fails_closed() {
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.script(&["loginctl", "list-sessions"], vec![out("7 0 root\n")]);
    let error = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap_err();
    assert_eq!(mismatches(error), ["login sessions wanted none, actual 7"]);
    assert!(run_lines(&sys).contains(&"loginctl kill-session --signal=SIGKILL 7".to_owned()));
}

#[test]
fn no_loginctl_means_no_sessions_and_a_failing_systemctl_stops_the_lockdown() {
    let tree = Tree::new();
    let sys = tree.kernel();
    sys.script(
        &["loginctl"],
        vec![Err(io::Error::from(io::ErrorKind::NotFound))],
    );
    let report = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap();
    assert!(matches!(
        outcome_of(&report, "login sessions"),
        Outcome::NotAvailable { .. }
    ));

    let sys = tree.kernel();
    sys.script(
        &["systemctl", "daemon-reexec"],
        vec![Ok(CommandOutput {
            code: Some(1),
            stdout: String::new(),
            stderr: "Failed to connect to bus: No such file or directory\n".into(),
        })],
    );
    let error = apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap_err();
    assert_eq!(
        error.to_string(),
        "`systemctl daemon-reexec` failed (exit 1): Failed to connect to bus: No such file or directory"
    );
}

// --- status -----------------------------------------------------------------------------------

fn failed_settings(status: &serde_json::Value) -> Vec<String> {
    status["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["setting"].as_str().unwrap().to_owned())
        .collect()
}

/// The tree after the PID 1 lockdown, the LSM in integrity mode as a kernel shows it.
fn pid1_locked_down() -> Tree {
    let tree = Tree::new();
    apply(
        &plan(&policy(None, &[]), Shape::Pid1),
        &tree.kernel(),
        &tree.paths,
    )
    .unwrap();
    write(&tree.paths.lockdown(), "none [integrity] confidentiality\n");
    tree
}

#[test]
fn status_reports_every_setting_and_whether_the_kernel_is_hardened() {
    let tree = Tree::new();
    let sys = FakeLockdownSys::new(RELEASE);
    let before = status_with(&tree.paths, &sys);
    assert_eq!(before["ok"], false);
    assert_eq!(before["shape"], "pid1");
    assert_eq!(before["kernel_lockdown"], "none");
    let failed = failed_settings(&before);
    for setting in [
        "kernel.sysrq",
        "swap",
        "kernel lockdown",
        "root password",
        "login shells",
    ] {
        assert!(failed.iter().any(|f| f == setting), "{setting}: {failed:?}");
    }
    // No systemd: the masks are read but do not apply, and no command is run.
    assert_eq!(before["systemd_masks"][0]["state"], "skipped");
    assert_eq!(
        before["systemd_masks"][0]["actual"],
        "not masked (PID 1 shape: systemd is not running)"
    );
    assert!(sys.calls().is_empty());

    let tree = pid1_locked_down();
    let after = status_with(&tree.paths, &sys);
    assert_eq!(after["ok"], true, "{after:#}");
    assert_eq!(after["failed"], serde_json::json!([]));
    assert_eq!(after["accounts"][0]["actual"], "locked");
    assert_eq!(after["accounts"][1]["actual"], "none left");
    assert!(after["kernel"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["setting"] == "kernel lockdown" && c["state"] == "ok"));
}

#[test]
fn status_fails_on_the_lockdown_mode_and_on_each_account_check() {
    // The lockdown LSM at `none` fails the status, though every other setting holds.
    let tree = pid1_locked_down();
    write(&tree.paths.lockdown(), "[none] integrity confidentiality\n");
    let sys = FakeLockdownSys::new(RELEASE);
    let status = status_with(&tree.paths, &sys);
    assert_eq!(status["ok"], false);
    assert_eq!(failed_settings(&status), ["kernel lockdown"]);
    // Without the LSM it is not available, which does not fail it.
    fs::remove_file(tree.paths.lockdown()).unwrap();
    let status = status_with(&tree.paths, &sys);
    assert_eq!(status["ok"], true, "{status:#}");
    assert_eq!(status["kernel_lockdown"], serde_json::Value::Null);

    // A usable root password alone fails it.
    let tree = pid1_locked_down();
    write(&tree.paths.shadow, "root:$6$salt$hash:19000:0:99999:7:::\n");
    let status = status_with(&tree.paths, &sys);
    assert_eq!(status["ok"], false);
    assert_eq!(failed_settings(&status), ["root password"]);

    // A login shell alone fails it.
    let tree = pid1_locked_down();
    let passwd = fs::read_to_string(&tree.paths.passwd).unwrap();
    write(
        &tree.paths.passwd,
        &format!("{passwd}op:x:1001:1001::/home/op:/bin/bash\n"),
    );
    let status = status_with(&tree.paths, &sys);
    assert_eq!(status["ok"], false);
    assert_eq!(failed_settings(&status), ["login shells"]);
}

#[test]
fn status_under_systemd_asks_systemd_for_the_masks_and_the_burst_action() {
    let tree = Tree::new();
    fs::create_dir_all(&tree.paths.systemd_runtime).unwrap();
    write(&tree.paths.lockdown(), "none [integrity] confidentiality\n");
    let sys = tree.kernel();
    let before = status_with(&tree.paths, &sys);
    assert_eq!(before["shape"], "systemd");
    assert_eq!(before["ok"], false);
    let failed = failed_settings(&before);
    assert!(
        failed.contains(&"mask getty@.service".to_owned()),
        "{failed:?}"
    );
    assert!(failed.contains(&"systemd CtrlAltDelBurstAction".to_owned()));
    // Accounts are shut by the masks in this shape: read, skipped, never failing.
    assert_eq!(before["accounts"][0]["state"], "skipped");
    assert_eq!(
        before["accounts"][0]["actual"],
        "usable (systemd shape: logins are shut by the masks)"
    );

    apply(&plan(&policy(None, &[]), Shape::Systemd), &sys, &tree.paths).unwrap();
    let after = status_with(&tree.paths, &sys);
    assert_eq!(after["ok"], true, "{after:#}");
    let masks = after["systemd_masks"].as_array().unwrap();
    assert_eq!(masks.len(), MASKED_UNITS.len() + 2);
    assert!(masks.iter().all(|c| c["state"] == "ok"), "{masks:#?}");

    // A unit file that outranks the mask: the link is still there, systemd says loaded.
    sys.script(
        &[
            "systemctl",
            "show",
            "-p",
            "LoadState",
            "--value",
            "ssh.socket",
        ],
        vec![out("loaded\n")],
    );
    let overridden = status_with(&tree.paths, &sys);
    assert_eq!(overridden["ok"], false);
    assert_eq!(failed_settings(&overridden), ["mask ssh.socket"]);
    assert_eq!(
        overridden["failed"][0]["actual"],
        "/dev/null, ssh.socket loaded"
    );
}

// --- root password in /etc/passwd ------------------------------------------------------------

#[test]
fn a_root_hash_in_passwd_is_locked_by_the_root_step_and_judged_there() {
    assert_eq!(
        lock_root_in_passwd("root:$1$abc:0:0::/root:/bin/sh\nfl:x:1:1::/:/bin/sh\n")
            .unwrap()
            .unwrap(),
        "root:!$1$abc:0:0::/root:/bin/sh\nfl:x:1:1::/:/bin/sh\n"
    );
    assert_eq!(
        lock_root_in_passwd("root::0:0::/root:/bin/sh")
            .unwrap()
            .unwrap(),
        "root:!:0:0::/root:/bin/sh"
    );
    assert_eq!(
        lock_root_in_passwd("root:x:0:0::/:/bin/sh\n").unwrap(),
        None
    );
    assert_eq!(
        lock_root_in_passwd("root:!$1$a:0:0::/:/bin/sh\n").unwrap(),
        None
    );
    assert_eq!(
        lock_root_in_passwd("root:a:0:0::/:/bin/sh\nroot:b:0:0::/:/bin/sh\n").unwrap_err(),
        "root is listed twice"
    );

    // shadow has root locked, but pam_unix reads the hash in passwd: the check judges that.
    let tree = Tree::new();
    write(&tree.paths.shadow, "root:!$6$salt$hash:19000::::::\n");
    write(
        &tree.paths.passwd,
        "root:$1$abc:0:0:root:/root:/usr/sbin/nologin\n",
    );
    let mut only_root = plan(&policy(None, &[]), Shape::Pid1);
    only_root.nologin_shells = false;
    let status = status_with(&tree.paths, &FakeLockdownSys::new(RELEASE));
    assert_eq!(status["accounts"][0]["actual"], "usable password in passwd");
    assert_eq!(status["accounts"][0]["state"], "failed");
    let sys = tree.kernel();
    let report = apply(&only_root, &sys, &tree.paths).unwrap();
    assert_eq!(outcome_of(&report, "root password"), &Outcome::AlreadySet);
    assert_eq!(
        outcome_of(&report, "root password in passwd"),
        &Outcome::Applied
    );
    assert!(fs::read_to_string(&tree.paths.passwd)
        .unwrap()
        .starts_with("root:!$1$abc:"));
    let root = report
        .checks
        .iter()
        .find(|c| c.setting == "root password")
        .unwrap();
    assert_eq!(
        (root.actual.as_str(), root.state),
        ("locked (in passwd)", CheckState::Ok)
    );

    // An empty passwd field is an empty password, whatever shadow says.
    write(
        &tree.paths.passwd,
        "root::0:0:root:/root:/usr/sbin/nologin\n",
    );
    let error = self_check(&only_root, &sys, &tree.paths).unwrap_err();
    assert_eq!(
        mismatches(error),
        ["root password wanted locked, actual usable password in passwd"]
    );
}

#[test]
fn mountinfo_and_swaps_are_parsed_with_escapes() {
    let mounts = mountinfo::parse(
        "24 22 0:23 / /my\\040tmp rw,nosuid shared:3 master:1 - tmpfs tmpfs rw\nbad\n",
    );
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].point, Path::new("/my tmp"));
    assert_eq!(mounts[0].fstype, "tmpfs");
    assert!(mounts[0].has("nosuid") && !mounts[0].has("nodev"));
    assert_eq!(
        mountinfo::parse_swaps("Filename Type\n/a\\040b partition 1 0 -2\n"),
        ["/a b"]
    );
    assert_eq!(mountinfo::escape("/a b\\"), "/a\\040b\\134");
}

// --- the modules a policy needs ---------------------------------------------------------------

fn parse_policy(text: &str) -> crate::policy::Policy {
    let users = crate::policy::MemoryUsers::new()
        .user("flare", 1000, 1000)
        .group("flare", 1000);
    crate::policy::parse(text, None, &users)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .policy
}

const BASE: &str = "[workload]\nbundle = \"/opt/b\"\nsource = \"initramfs\"\nexec = [\"/opt/b/run\"]\nuser = \"flare\"\n";

fn planned(plan: &ModulePlan) -> Vec<(&str, Vec<&str>)> {
    plan.modules
        .iter()
        .map(|m| {
            (
                m.name.as_str(),
                m.needed_by.iter().map(String::as_str).collect(),
            )
        })
        .collect()
}

#[test]
fn the_module_plan_follows_the_policys_features() {
    // Nothing configured that needs a module: nothing planned.
    let bare = parse_policy(&format!("attestation = \"none\"\n{BASE}"));
    assert!(module_plan(&bare).is_empty());

    let policy = parse_policy(&format!(
        "{BASE}\n[attestation]\ntee = \"tpm\"\nkbs = \"http://10.0.2.100:5555\"\ninsecure_http = true\n\n\
         [network]\n\n\
         [[volume]]\nname = \"data\"\ndevice = \"/dev/vdb\"\nkey = \"kbs:///default/keys/data\"\nmount = \"/data\"\nintegrity = \"hmac-sha256\"\n\n\
         [kernel]\nmodules = [\"virtio_net\", \"virtio-blk\"]\n\n\
         [lockdown]\nmodules = [\"dm-crypt\", \"vsock\"]\n"
    ));
    let plan = module_plan(&policy);
    let tee = "attestation.tee = \"tpm\"";
    assert_eq!(
        planned(&plan),
        [
            ("virtio_net", vec!["kernel.modules"]),
            ("virtio_blk", vec!["kernel.modules"]),
            ("dm_crypt", vec!["lockdown.modules", "[[volume]] data"]),
            ("vsock", vec!["lockdown.modules"]),
            ("tpm_tis", vec![tee]),
            ("tpm_crb", vec![tee]),
            ("nf_tables", vec!["[network]"]),
            ("nf_conntrack", vec!["[network]"]),
            ("nft_ct", vec!["[network]"]),
            ("crc32c_generic", vec!["[network]", "[[volume]] data"]),
            ("xts", vec!["[[volume]] data"]),
            ("ecb", vec!["[[volume]] data"]),
            ("af_alg", vec!["[[volume]] data"]),
            ("algif_skcipher", vec!["[[volume]] data"]),
            ("ext4", vec!["[[volume]] data"]),
            ("dm_integrity", vec!["[[volume]] data integrity"]),
            ("authenc", vec!["[[volume]] data integrity"]),
        ]
    );
    // Either TPM driver serves; nothing else has an alternative.
    let tis = plan.modules.iter().find(|m| m.name == "tpm_tis").unwrap();
    assert_eq!(tis.or, ["tpm_crb"]);
    assert!(plan
        .modules
        .iter()
        .filter(|m| !m.name.starts_with("tpm_"))
        .all(|m| m.or.is_empty()));
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["load"][4]["or"], serde_json::json!(["tpm_crb"]));
    assert!(json["load"][0].get("or").is_none());

    let snp = parse_policy(&format!(
        "{BASE}digest = \"sha256:{}\"\n\n[attestation]\ntee = \"snp\"\nkbs = \"http://10.0.2.100:5555\"\ninsecure_http = true\n\n[network]\n",
        "ab".repeat(32)
    ));
    assert_eq!(
        planned(&module_plan(&snp))[0],
        ("sev_guest", vec!["attestation.tee = \"snp\""])
    );
}

/// A plan of named modules, each needed by `feature`.
fn plan_of(modules: &[(&str, &[&str])]) -> ModulePlan {
    ModulePlan {
        modules: modules
            .iter()
            .map(|(name, or)| PlannedModule {
                name: module_name(name),
                needed_by: vec!["[[volume]] data".to_owned()],
                or: or.iter().map(|m| module_name(m)).collect(),
            })
            .collect(),
    }
}

#[test]
fn planned_modules_load_dependencies_first_and_the_report_says_what_was_there() {
    let tree = Tree::new();
    fs::create_dir_all(tree.paths.sys_module.join("virtio_rng")).unwrap();
    let sys = tree.kernel();
    let plan = plan_of(&[
        ("dm-crypt", &[]),
        ("virtio_rng", &[]),
        ("sha256_generic", &[]),
        ("tpm_tis", &["sha256_generic"]),
    ]);
    let report = load_planned(&plan, &sys, &tree.paths).unwrap();
    let dir = tree.paths.lib_modules.join(RELEASE);
    assert_eq!(
        sys.calls(),
        vec![
            LockdownCall::FinitModule {
                path: dir.join("kernel/crypto/ecb.ko"),
                compressed: false,
            },
            LockdownCall::FinitModule {
                path: dir.join("kernel/drivers/md/dm-mod.ko.zst"),
                compressed: true,
            },
            LockdownCall::FinitModule {
                path: dir.join("kernel/drivers/md/dm-crypt.ko.zst"),
                compressed: true,
            },
        ]
    );
    assert_eq!(
        report,
        ModuleReport {
            release: RELEASE.to_owned(),
            modules_dir: dir,
            loaded: vec!["ecb".into(), "dm_mod".into(), "dm_crypt".into()],
            already_loaded: vec!["virtio_rng".into()],
            built_in: vec!["sha256_generic".into()],
            absent_served: vec!["tpm_tis".into()],
        }
    );
    // Loaded now (the fake kernel shows it in /sys/module): a second boot step loads nothing.
    let again = load_planned(&plan, &sys, &tree.paths).unwrap();
    assert!(again.loaded.is_empty());
    assert_eq!(again.already_loaded, ["dm_crypt", "virtio_rng"]);
    assert_eq!(sys.calls().len(), 3);
}

#[test]
fn a_needed_module_that_is_nowhere_stops_before_anything_is_loaded_and_says_what_needs_it() {
    let tree = Tree::new();
    let sys = tree.kernel();
    // An alternative that is absent too does not serve.
    let plan = plan_of(&[("dm_crypt", &[]), ("ecb", &[]), ("tpm_tis", &["tpm_crb"])]);
    let error = load_planned(&plan, &sys, &tree.paths).unwrap_err();
    assert!(sys.calls().is_empty(), "{:?}", sys.calls());
    assert_eq!(
        error.to_string(),
        format!(
            "kernel module tpm_tis (needed by [[volume]] data) is not loaded, not built in and not \
             in {}; hint: put the module of kernel {RELEASE} and its dependencies into the image \
             and run depmod (`cvm-warden plan` lists the modules the policy needs), or build it \
             into the kernel",
            tree.paths.lib_modules.join(RELEASE).join("modules.dep").display()
        )
    );
    // A module file that modules.dep names but the image lacks.
    fs::remove_file(
        tree.paths
            .lib_modules
            .join(RELEASE)
            .join("kernel/crypto/ecb.ko"),
    )
    .unwrap();
    let error = load_planned(&plan_of(&[("dm-crypt", &[])]), &sys, &tree.paths).unwrap_err();
    assert!(
        matches!(&error, LockdownError::ModuleFileMissing { module, .. } if module == "ecb"),
        "{error:?}"
    );
    assert!(sys.calls().is_empty());
}

#[test]
fn a_compressed_module_the_kernel_cannot_decompress_is_refused_by_name() {
    let tree = Tree::new();
    let sys = tree.kernel();
    let error = load_planned(&plan_of(&[("vsock", &[])]), &sys, &tree.paths).unwrap_err();
    assert!(
        error.to_string().starts_with("kernel module vsock ("),
        "{error}"
    );
    assert!(
        matches!(&error, LockdownError::ModuleCompression { format, .. } if format == "xz"),
        "{error:?}"
    );
    assert!(sys.calls().is_empty());
}

#[test]
fn an_alternative_serves_only_when_present_or_loaded_too() {
    let tree = Tree::new();
    let sys = tree.kernel();
    // virtio_rng could be loaded but is not planned: nothing would load it, so it serves not.
    let error =
        load_planned(&plan_of(&[("tpm_tis", &["virtio_rng"])]), &sys, &tree.paths).unwrap_err();
    assert!(
        matches!(&error, LockdownError::ModuleNotFound { module, .. } if module == "tpm_tis"),
        "{error:?}"
    );
    // Planned too: it is loaded and serves.
    let report = load_planned(
        &plan_of(&[("tpm_tis", &["virtio_rng"]), ("virtio_rng", &["tpm_tis"])]),
        &sys,
        &tree.paths,
    )
    .unwrap();
    assert_eq!(report.loaded, ["virtio_rng"]);
    assert_eq!(report.absent_served, ["tpm_tis"]);
}

/// The fixture's tree with soft dependencies: dm_crypt asks for a "crypto-xts"
/// implementation first (one file is in the image, a CPU-specific one is not) and for
/// "crypto-ecb", which is also one of its hard dependencies.
fn softdep_tree() -> Tree {
    let tree = Tree::new();
    let dir = tree.paths.lib_modules.join(RELEASE);
    fs::write(
        dir.join("modules.softdep"),
        "softdep dm_crypt pre: crypto-xts crypto-ecb\n",
    )
    .unwrap();
    fs::write(
        dir.join("modules.alias"),
        "alias crypto-xts xts_fast\nalias crypto-xts virtio_rng\nalias crypto-ecb ecb\n",
    )
    .unwrap();
    let dep = fs::read_to_string(dir.join("modules.dep")).unwrap();
    fs::write(
        dir.join("modules.dep"),
        format!("{dep}kernel/arch/x86/crypto/xts_fast.ko:\n"),
    )
    .unwrap();
    tree
}

#[test]
fn soft_dependencies_are_optional_unless_something_needs_them_hard() {
    let tree = softdep_tree();
    let sys = tree.kernel();
    load_planned(&plan_of(&[("dm-crypt", &[])]), &sys, &tree.paths).unwrap();
    let loaded: Vec<String> = sys
        .calls()
        .iter()
        .filter_map(|c| match c {
            LockdownCall::FinitModule { path, .. } => {
                Some(path.file_name().unwrap().to_string_lossy().into_owned())
            }
            _ => None,
        })
        .collect();
    // xts_fast's file is missing: left out; virtio_rng (present) loads right before dm_crypt,
    // after its hard dependencies; ecb once.
    assert_eq!(
        loaded,
        [
            "ecb.ko",
            "dm-mod.ko.zst",
            "virtio_rng.ko",
            "dm-crypt.ko.zst"
        ]
    );
    // A hard dependency whose file is missing still stops the boot, soft or not.
    let tree = softdep_tree();
    fs::remove_file(
        tree.paths
            .lib_modules
            .join(RELEASE)
            .join("kernel/crypto/ecb.ko"),
    )
    .unwrap();
    let error =
        load_planned(&plan_of(&[("dm-crypt", &[])]), &tree.kernel(), &tree.paths).unwrap_err();
    assert!(error.to_string().contains("ecb"), "{error}");
}
