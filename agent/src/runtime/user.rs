//! Resolving who a container runs as, with CRI's rules: securityContext uid/gid win over the
//! image's `user` string (`name`, `uid`, `name:group`, `uid:gid`); names and a uid's primary
//! group are looked up in the rootfs's /etc/passwd and /etc/group, and the groups listing the
//! user become additional gids, followed by the pod's supplemental groups. Also the host
//! lookups the spec needs: device nodes, and a brief read-only mount of the rootfs to read
//! those two files.

use std::path::{Path, PathBuf};

use containerd_client::types::Mount as CtrMount;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::SFlag;

use super::spec::{DeviceNode, ResolvedUser};
use super::User;

/// One line of /etc/passwd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// One line of /etc/group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The rootfs's users and groups (empty when the files are absent).
#[derive(Clone, Debug, Default)]
pub struct UserDb {
    pub passwd: Vec<PasswdEntry>,
    pub groups: Vec<GroupEntry>,
}

impl UserDb {
    pub fn parse(passwd: &str, group: &str) -> Self {
        let passwd = passwd
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some(PasswdEntry {
                    name: f.first()?.to_string(),
                    uid: f.get(2)?.parse().ok()?,
                    gid: f.get(3)?.parse().ok()?,
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some(GroupEntry {
                    name: f.first()?.to_string(),
                    gid: f.get(2)?.parse().ok()?,
                    members: f
                        .get(3)
                        .map(|m| {
                            m.split(',')
                                .map(str::trim)
                                .filter(|s| !s.is_empty())
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect();
        UserDb { passwd, groups }
    }

    /// Reads `<root>/etc/passwd` and `<root>/etc/group`; symlinks are not followed (they could
    /// point out of the rootfs).
    pub fn read(root: &Path) -> std::io::Result<Self> {
        let read = |p: PathBuf| -> std::io::Result<String> {
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => std::fs::read_to_string(&p),
                Ok(_) => Ok(String::new()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) => Err(e),
            }
        };
        Ok(UserDb::parse(
            &read(root.join("etc/passwd"))?,
            &read(root.join("etc/group"))?,
        ))
    }
}

/// Resolves the process identity.
pub fn resolve_user(
    image_user: Option<&str>,
    user: &User,
    db: &UserDb,
) -> Result<ResolvedUser, String> {
    let user_str = match user.uid {
        Some(uid) => uid.to_string(),
        None => image_user.unwrap_or("").to_string(),
    };
    let (user_part, group_part) = match user_str.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user_str.as_str(), None),
    };
    let (uid, mut gid, name) = if user_part.is_empty() {
        (
            0,
            0,
            db.passwd
                .iter()
                .find(|p| p.uid == 0)
                .map(|p| p.name.clone()),
        )
    } else if let Ok(uid) = user_part.parse::<u32>() {
        let entry = db.passwd.iter().find(|p| p.uid == uid);
        (
            uid,
            entry.map_or(0, |e| e.gid),
            entry.map(|e| e.name.clone()),
        )
    } else {
        let entry = db
            .passwd
            .iter()
            .find(|p| p.name == user_part)
            .ok_or_else(|| format!("user {user_part:?} not found in the image's /etc/passwd"))?;
        (entry.uid, entry.gid, Some(entry.name.clone()))
    };
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                db.groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| format!("group {g:?} not found in the image's /etc/group"))?
                    .gid
            }
        };
    }
    if let Some(g) = user.gid {
        gid = g;
    }
    let mut additional: Vec<u32> = Vec::new();
    if let Some(name) = &name {
        for g in &db.groups {
            if g.name != *name
                && g.members.iter().any(|m| m == name)
                && !additional.contains(&g.gid)
            {
                additional.push(g.gid);
            }
        }
    }
    for g in &user.supplemental_groups {
        if !additional.contains(g) {
            additional.push(*g);
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: additional,
    })
}

/// Looks up a host device node for the container path `container_path`.
pub fn device_node(host: &Path, container_path: &str) -> Result<DeviceNode, String> {
    let st = nix::sys::stat::stat(host).map_err(|e| format!("{}: {e}", host.display()))?;
    let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    let kind = if fmt == SFlag::S_IFBLK {
        'b'
    } else if fmt == SFlag::S_IFCHR {
        'c'
    } else {
        return Err(format!("{} is not a device", host.display()));
    };
    Ok(DeviceNode {
        path: container_path.to_string(),
        kind,
        major: nix::sys::stat::major(st.st_rdev) as i64,
        minor: nix::sys::stat::minor(st.st_rdev) as i64,
        file_mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
    })
}

/// Every device node under /dev, for privileged containers (skipping the per-container
/// pseudo file systems, as containerd does).
pub fn host_devices() -> Vec<DeviceNode> {
    fn walk(dir: &Path, out: &mut Vec<DeviceNode>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                let name = e.file_name();
                let skip = ["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];
                if !skip.iter().any(|s| name == *s) {
                    walk(&path, out);
                }
            } else if !ft.is_symlink() && path != Path::new("/dev/console") {
                if let Ok(node) = device_node(&path, &path.to_string_lossy()) {
                    out.push(node);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/dev"), &mut out);
    out
}

/// Splits containerd mount options into mount flags and file-system data.
fn mount_flags(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// Mounts the rootfs described by `mounts` read-only at `target`, reads its user database
/// and unmounts it again.
pub fn read_rootfs_users(mounts: &[CtrMount], target: &Path) -> Result<UserDb, String> {
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    // A view left mounted by an agent that died here would otherwise be stacked upon.
    let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
    let mut mounted = false;
    let res = (|| {
        for m in mounts {
            let (mut flags, data) = mount_flags(&m.options);
            let is_bind = flags.contains(MsFlags::MS_BIND);
            if !is_bind {
                flags |= MsFlags::MS_RDONLY;
            }
            let fstype = if is_bind {
                None
            } else {
                Some(m.r#type.as_str())
            };
            let data = (!data.is_empty()).then_some(data.as_str());
            nix::mount::mount(Some(m.source.as_str()), target, fstype, flags, data).map_err(
                |e| {
                    format!(
                        "mounting rootfs ({}) at {}: {e}",
                        m.r#type,
                        target.display()
                    )
                },
            )?;
            mounted = true;
        }
        UserDb::read(target).map_err(|e| format!("reading users: {e}"))
    })();
    if mounted {
        if let Err(e) = nix::mount::umount2(target, MntFlags::MNT_DETACH) {
            tracing::warn!(target = %target.display(), error = %e, "unmounting rootfs view");
        }
    }
    let _ = std::fs::remove_dir(target);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1::/:/bin/false\n\
        www:x:33:33::/var/www:/bin/false\n\
        app:x:1000:1001::/home/app:/bin/sh\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:root,app\n\
        www:x:33:www\n\
        app:x:1001:app\n\
        video:x:44:app , www\n";

    fn db() -> UserDb {
        UserDb::parse(PASSWD, GROUP)
    }

    #[test]
    fn parses_files() {
        let d = db();
        assert_eq!(d.passwd.len(), 4);
        assert_eq!(d.groups[1].members, vec!["root", "app"]);
        assert_eq!(d.groups[4].members, vec!["app", "www"]);
    }

    #[test]
    fn image_user_by_name_and_group() {
        let r = resolve_user(Some("app"), &User::default(), &db()).unwrap();
        assert_eq!(
            r,
            ResolvedUser {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![10, 44]
            }
        );
        let r = resolve_user(Some("app:www"), &User::default(), &db()).unwrap();
        assert_eq!(r.gid, 33);
        let r = resolve_user(Some("33:44"), &User::default(), &db()).unwrap();
        assert_eq!((r.uid, r.gid), (33, 44));
        assert_eq!(r.additional_gids, vec![44]);
        assert!(resolve_user(Some("nobody"), &User::default(), &db()).is_err());
        assert!(resolve_user(Some("app:nogroup"), &User::default(), &db()).is_err());
    }

    #[test]
    fn security_context_wins() {
        let u = User {
            uid: Some(1000),
            gid: None,
            supplemental_groups: vec![2000, 10],
        };
        let r = resolve_user(Some("www"), &u, &db()).unwrap();
        assert_eq!(
            r,
            ResolvedUser {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![10, 44, 2000]
            }
        );
        let u = User {
            uid: Some(4242),
            gid: Some(7),
            supplemental_groups: vec![],
        };
        let r = resolve_user(Some("app"), &u, &db()).unwrap();
        assert_eq!(
            r,
            ResolvedUser {
                uid: 4242,
                gid: 7,
                additional_gids: vec![]
            }
        );
        let u = User {
            uid: None,
            gid: Some(5),
            supplemental_groups: vec![],
        };
        let r = resolve_user(Some("app"), &u, &db()).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 5));
    }

    #[test]
    fn default_is_root() {
        let r = resolve_user(None, &User::default(), &db()).unwrap();
        assert_eq!(
            r,
            ResolvedUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![10]
            }
        );
        let r = resolve_user(None, &User::default(), &UserDb::default()).unwrap();
        assert_eq!(r, ResolvedUser::default());
    }

    #[test]
    fn mount_options_split() {
        let (f, d) = mount_flags(&[
            "index=off".into(),
            "workdir=/w".into(),
            "ro".into(),
            "rbind".into(),
        ]);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert_eq!(d, "index=off,workdir=/w");
    }

    #[test]
    fn device_lookup() {
        let n = device_node(Path::new("/dev/null"), "/dev/mynull").unwrap();
        assert_eq!((n.kind, n.major, n.minor), ('c', 1, 3));
        assert_eq!(n.path, "/dev/mynull");
        assert!(device_node(Path::new("/etc/hostname"), "/x").is_err());
    }
}
