//! Reading configuration files that may not be what they claim.

use std::io;
use std::path::Path;

use std::io::Read;

use tokio::io::AsyncReadExt;

/// Reads `path` whole if it holds at most `max` bytes; a longer file (or `/dev/zero`, or a
/// FIFO that never ends) is refused after `max + 1` bytes with [`io::ErrorKind::FileTooLarge`]
/// instead of being read into memory first and measured after.
pub async fn read_at_most(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(past(max)).read_to_end(&mut bytes).await?;
    within(bytes, max)
}

/// [`read_at_most`] for start-up, before any runtime thread is worth keeping free.
pub fn read_at_most_blocking(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(past(max)).read_to_end(&mut bytes)?;
    within(bytes, max)
}

/// One byte past `max`: reading that far tells a file of `max` bytes from a longer one.
fn past(max: usize) -> u64 {
    u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1)
}

fn within(bytes: Vec<u8>, max: usize) -> io::Result<Vec<u8>> {
    if bytes.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_past_the_cap_is_refused_without_being_read_whole() {
        let dir = std::env::temp_dir().join(format!("read-at-most-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_at_most(&path, 5).await.unwrap(), b"12345");
        let err = read_at_most(&path, 4).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        // An endless file stops at the cap.
        let err = read_at_most(Path::new("/dev/zero"), 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        assert!(read_at_most(&dir.join("missing"), 5).await.is_err());
        assert_eq!(read_at_most_blocking(&path, 5).unwrap(), b"12345");
        for (file, cap) in [(path.as_path(), 4), (Path::new("/dev/zero"), 1 << 20)] {
            let err = read_at_most_blocking(file, cap).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
