//! The migration's and the snapshots' keys: how the two ends of a migration know each
//! other, and the key files they are read from.

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;

use vmcraft::migration::{MigrationAuth, PublicKey, StaticKey};
use vmcraft::snapshot::open_snapshot_file;

use crate::cli::Args;

/// How the two ends of a migration know each other, from the files named.
pub fn migration_auth(args: &Args) -> Result<Option<MigrationAuth>, Box<dyn Error>> {
    if let Some(path) = &args.migrate_secret {
        let secret = read_key_file(path, "migration secret")?;
        return Ok(Some(
            MigrationAuth::shared_secret(secret).map_err(|e| format!("{}: {e}", path.display()))?,
        ));
    }
    let (Some(key), Some(peer)) = (&args.migrate_key, &args.migrate_peer) else {
        return Ok(None);
    };
    let text = |path: &Path, what: &str| -> Result<String, String> {
        String::from_utf8(read_key_file(path, what)?)
            .map_err(|_| format!("{what} {} is not text", path.display()))
    };
    let local = StaticKey::from_file_text(&text(key, "migration key")?)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let peers = text(peer, "migration peer keys")?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(PublicKey::from_hex)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", peer.display()))?;
    Ok(Some(MigrationAuth::Keys { local, peers }))
}

/// The contents of a secret or key file: a regular file of at most 64 KiB (a device or
/// a FIFO named there is refused rather than read without end).
pub fn read_key_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    const MAX: u64 = 64 << 10;
    let failed = |e: &dyn std::fmt::Display| format!("cannot read {what} {}: {e}", path.display());
    let file = open_snapshot_file(path, "key file").map_err(|e| failed(&e))?;
    let mut bytes = Vec::new();
    file.take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed(&e))?;
    if bytes.len() as u64 > MAX {
        return Err(format!(
            "{what} {} is larger than {MAX} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Write a new migration key pair to `path` (which must not exist), readable by its
/// owner only, and print its public key.
pub fn keygen(path: &Path) -> Result<ExitCode, Box<dyn Error>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = StaticKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create key file {}: {e}", path.display()))?;
    file.write_all(key.to_file_text().as_bytes())?;
    println!("{}", key.public());
    Ok(ExitCode::SUCCESS)
}
