//! Stage 4, unlock: the broker releases the volume keys and the workload's secrets.
//!
//! - `[[secret]]` entries are fetched into a fresh tmpfs at [`SECRETS_DIR`] (`nosuid,nodev,
//!   noexec`, mode 0500, owned by the workload user), one file each, mode 0400, owned by the
//!   workload user. The bytes live only in memory (tmpfs) and in a zeroized buffer while
//!   being written; the audit log records the name, resource and length, never the bytes.
//!
//! - `[[volume]]` entries: the key is fetched, then [`crate::volume::unlock_notified`] opens
//!   the LUKS2 volume (formatting it only when blank and `format_if_blank = true`), checks its
//!   token names the same resource, creates ext4 (root owned by the volume's `owner:group`,
//!   then its `mode`) while the token says `initialising`, marks it `ready`, and mounts it
//!   `nosuid,nodev` (and `noexec` unless `allow_exec = true`); a `ready` volume's root must
//!   have the policy's owner, group and mode. The key is a zeroized buffer dropped right
//!   after. State changes are audited before they happen: `unlock/volume_format` (a blank
//!   device is formatted), `unlock/volume_resume` (the token says `initialising`: a first boot
//!   stopped early, the file system is made again) and, after, `unlock/volume_ready`.

use std::path::PathBuf;

use nix::mount::MsFlags;
use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, StageError};
use crate::policy::{Policy, ResourceUri, Volume, SECRETS_DIR};
use crate::volume::{self, Notice, VolumeKey, VolumeSpec};

/// Size limit of the secrets tmpfs.
pub const SECRETS_TMPFS_SIZE: &str = "4m";

/// One secret to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretPlan {
    /// File name.
    pub name: String,
    /// Broker resource.
    pub resource: ResourceUri,
    /// Full path of the file.
    pub path: PathBuf,
    /// Owner (the workload user).
    pub uid: u32,
    /// Group (the workload's primary group).
    pub gid: u32,
}

/// What the unlock stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Volumes to unlock, in policy order.
    pub volumes: Vec<Volume>,
    /// Secrets delivered to the workload.
    pub secrets: Vec<SecretPlan>,
    /// The tmpfs that receives them (only mounted when there are secrets).
    pub secrets_dir: PathBuf,
    /// Its mount options.
    pub secrets_mount: String,
}

/// Plans the unlock stage. Pure.
pub fn plan(policy: &Policy) -> Result<Plan, StageError> {
    for volume in &policy.volumes {
        VolumeSpec::from_policy(volume).map_err(|source| volume_error(volume, source))?;
    }
    let user = &policy.workload.user;
    Ok(Plan {
        volumes: policy.volumes.clone(),
        secrets: policy
            .secrets
            .iter()
            .map(|s| SecretPlan {
                name: s.name.clone(),
                resource: s.resource.clone(),
                path: s.path.clone(),
                uid: user.uid,
                gid: user.gid,
            })
            .collect(),
        secrets_dir: PathBuf::from(SECRETS_DIR),
        secrets_mount: secrets_mount_data(user.uid, user.gid),
    })
}

fn volume_error(volume: &Volume, source: volume::VolumeError) -> StageError {
    StageError::Volume {
        name: volume.name.clone(),
        device: volume.device.display().to_string(),
        source: Box::new(source),
    }
}

/// Fetches one resource from the broker, recording every try as `unlock/try`; `what` names
/// the volume or secret in the error.
fn fetch(
    fx: &mut Effects<'_>,
    uri: &ResourceUri,
    what: String,
) -> Result<zeroize::Zeroizing<Vec<u8>>, StageError> {
    let audit = fx.audit;
    let Some(broker) = fx.broker.as_deref_mut() else {
        return Err(StageError::Broker {
            stage: "unlock",
            what,
            source: "the policy lists volumes or secrets but the boot has no key broker; this is a bug, report it".into(),
        });
    };
    super::audited_broker_call(
        audit,
        "unlock",
        || what,
        |attempt| broker.fetch(uri, attempt),
    )
}

/// `{"owner": uid, "group": gid, "mode": "0700"}`.
fn root_json(root: volume::RootAttrs) -> Value {
    json!({
        "owner": root.uid,
        "group": root.gid,
        "mode": format!("{:04o}", root.mode),
    })
}

/// The audit event and details of a volume [`Notice`].
pub fn notice_record(spec: &VolumeSpec, notice: Notice) -> (&'static str, Value) {
    let mut details = json!({
        "name": spec.name,
        "device": spec.device,
        "resource": spec.resource,
        "root": root_json(spec.root),
    });
    let (event, what) = match notice {
        Notice::Format => (
            "volume_format",
            "the device is blank (no LUKS2 header, first MiB all zeros) and format_if_blank = \
             true: formatting LUKS2, token state initialising",
        ),
        Notice::Resume => (
            "volume_resume",
            "the LUKS2 token says initialising: an earlier first boot stopped before the volume \
             was ready, so no workload ran on it; making its file system again",
        ),
        Notice::Ready => (
            "volume_ready",
            "file system made, root owner and mode set and synced; token state ready",
        ),
    };
    details["what"] = what.into();
    (event, details)
}

/// tmpfs options of the secrets directory.
pub fn secrets_mount_data(uid: u32, gid: u32) -> String {
    format!("mode=0500,uid={uid},gid={gid},size={SECRETS_TMPFS_SIZE},nr_inodes=256")
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let mut opened = Vec::new();
    for volume in &plan.volumes {
        let spec = VolumeSpec::from_policy(volume).map_err(|e| volume_error(volume, e))?;
        let bytes = fetch(
            fx,
            &volume.key,
            format!("key of volume {:?} from {}", volume.name, volume.key),
        )?;
        let key = VolumeKey::new(bytes, volume.key.clone()).map_err(|e| volume_error(volume, e))?;
        let audit = fx.audit;
        let mut notify = |notice: Notice| -> Result<(), volume::NoticeError> {
            let (event, details) = notice_record(&spec, notice);
            audit.record("unlock", event, details)?;
            Ok(())
        };
        let unlocked = volume::unlock_notified(fx.volumes, &spec, &key, &mut notify)
            .map_err(|e| volume_error(volume, e))?;
        drop(key);
        opened.push(json!({
            "name": volume.name,
            "device": volume.device,
            "resource": volume.key,
            "mapped": unlocked.mapped,
            "keyslot": unlocked.keyslot,
            "formatted": unlocked.formatted,
            "filesystem": unlocked.step,
            "root": root_json(unlocked.root),
            "mount": volume.mount,
            "noexec": !volume.allow_exec,
        }));
    }
    let mut delivered = Vec::new();
    if !plan.secrets.is_empty() {
        let sys_err = |source| StageError::Sys {
            stage: "unlock",
            source: Box::new(source),
        };
        fx.sys.mkdir_all(&plan.secrets_dir).map_err(sys_err)?;
        fx.sys
            .mount(
                Some("tmpfs"),
                &plan.secrets_dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(&plan.secrets_mount),
            )
            .map_err(sys_err)?;
        for secret in &plan.secrets {
            let bytes = fetch(
                fx,
                &secret.resource,
                format!("secret {:?} from {}", secret.name, secret.resource),
            )?;
            fx.sys
                .write_private(&secret.path, &bytes, secret.uid, secret.gid)
                .map_err(sys_err)?;
            delivered.push(json!({
                "name": secret.name,
                "resource": secret.resource,
                "path": secret.path,
                "bytes": bytes.len(),
                "owner": format!("{}:{}", secret.uid, secret.gid),
                "mode": "0400",
            }));
            // `bytes` is Zeroizing: wiped here.
        }
    }
    Ok(json!({ "volumes": opened, "secrets": delivered }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::volume::{MountOptions, RootAttrs};

    fn spec() -> VolumeSpec {
        VolumeSpec {
            name: "workspace".to_string(),
            device: PathBuf::from("/dev/vdb"),
            resource: ResourceUri::parse("kbs:///default/keys/workspace").unwrap(),
            mountpoint: PathBuf::from("/workspace"),
            format_if_blank: true,
            integrity: None,
            mount: MountOptions { noexec: true },
            root: RootAttrs {
                uid: 1000,
                gid: 1000,
                mode: 0o700,
            },
        }
    }

    #[test]
    fn each_volume_notice_has_its_own_audit_event_naming_the_volume() {
        let spec = spec();
        let events: Vec<(&str, Value)> = [Notice::Format, Notice::Resume, Notice::Ready]
            .into_iter()
            .map(|n| notice_record(&spec, n))
            .collect();
        let names: Vec<&str> = events.iter().map(|(e, _)| *e).collect();
        assert_eq!(names, ["volume_format", "volume_resume", "volume_ready"]);
        for (_, details) in &events {
            assert_eq!(details["name"], "workspace");
            assert_eq!(details["device"], "/dev/vdb");
            assert_eq!(details["resource"], "kbs:///default/keys/workspace");
            assert_eq!(
                details["root"],
                json!({"owner": 1000, "group": 1000, "mode": "0700"})
            );
        }
        assert!(events[1].1["what"]
            .as_str()
            .unwrap()
            .contains("the LUKS2 token says initialising"));
    }
}
