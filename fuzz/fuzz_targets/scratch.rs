//! Shared by the disk fuzz targets: one scratch image per process (unlinked at once),
//! handed out as fresh descriptors.
#![allow(dead_code)] // each target uses a different part

use std::fs::File;
use std::sync::OnceLock;

/// A descriptor on this process's `sectors`-sector scratch image.
pub fn image(sectors: u64) -> File {
    static IMAGE: OnceLock<File> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path =
                std::env::temp_dir().join(format!("vmcraft-fuzz-{}.img", std::process::id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            std::fs::remove_file(&path).unwrap();
            f.set_len(sectors * 512).unwrap();
            f
        })
        .try_clone()
        .unwrap()
}
