//! Whose segments are trusted by default. Besides our own uid and root
//! (always), the uid of the `ringside-engine` system user, when the host has
//! one: the package creates it (sysusers.d) to run the engines, so on a
//! packaged host the daemon and a `ringside` group member's `tracing`, `set`,
//! `status`, `top` and `inflight` need no `--trusted-uid`. Its uid differs
//! per host, so it is looked up, never shipped.

use std::io::Read;

/// The system user the engine unit runs as.
pub const ENGINE_USER: &str = "ringside-engine";

/// Where system users live (sysusers.d writes them there, not to NSS).
const PASSWD: &str = "/etc/passwd";
/// A larger file is not a passwd file we read.
const PASSWD_MAX_BYTES: u64 = 4 << 20;

/// `uids` and, if the host has the engine user, its uid.
pub fn with_engine_user(mut uids: Vec<u32>) -> Vec<u32> {
    if let Some(uid) = engine_user_uid()
        && !uids.contains(&uid)
    {
        uids.push(uid);
    }
    uids
}

/// The uid of [`ENGINE_USER`] in `/etc/passwd`, if any.
fn engine_user_uid() -> Option<u32> {
    let mut text = String::new();
    std::fs::File::open(PASSWD)
        .ok()?
        .take(PASSWD_MAX_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    uid_of(&text, ENGINE_USER)
}

/// The uid of `user` in passwd-format `text` (`name:password:uid:…`).
fn uid_of(text: &str, user: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::uid_of;

    #[test]
    fn the_engine_user_s_uid_is_read_from_passwd_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      ringside-engine-old:x:7:7::/:/usr/sbin/nologin\n\
                      ringside-engine:x:998:997:ringside engine:/var/lib/ringside:/usr/sbin/nologin\n";
        assert_eq!(uid_of(passwd, "ringside-engine"), Some(998));
        assert_eq!(uid_of(passwd, "ringside"), None, "a prefix is not a user");
        assert_eq!(
            uid_of("ringside-engine:x:not-a-uid:1::/:", "ringside-engine"),
            None
        );
        assert_eq!(
            uid_of("ringside-engine", "ringside-engine"),
            None,
            "a truncated line"
        );
        assert_eq!(uid_of("", "ringside-engine"), None);
    }
}
