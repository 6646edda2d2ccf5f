//! `DIR/results.json`: one benchmark's results, with its name and format version.
use crate::{Error, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};

/// The results file's format version (a file of another version is refused).
pub const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    benchmark: String,
    format: u32,
    data: T,
}

/// The file a benchmark's results live in.
pub fn results_path(dir: &Path) -> PathBuf {
    dir.join("results.json")
}

/// Writes `DIR/results.json` (the directory is created).
pub fn write_results<T: Serialize>(dir: &Path, benchmark: &str, data: &T) -> Result<PathBuf> {
    let path = results_path(dir);
    let io = |error| Error::Io {
        path: path.clone(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let env = Envelope {
        benchmark: benchmark.to_string(),
        format: FORMAT,
        data,
    };
    let mut text = serde_json::to_string_pretty(&env).map_err(|error| Error::Parse {
        path: path.clone(),
        error,
    })?;
    text.push('\n');
    std::fs::write(&path, text).map_err(io)?;
    Ok(path)
}

/// Reads `DIR/results.json`, which must be `benchmark`'s, of this format.
pub fn read_results<T: DeserializeOwned>(dir: &Path, benchmark: &str) -> Result<T> {
    let path = results_path(dir);
    let text = std::fs::read_to_string(&path).map_err(|error| Error::Io {
        path: path.clone(),
        error,
    })?;
    let parse = |error| Error::Parse {
        path: path.clone(),
        error,
    };
    // The header first, so a file of another benchmark or format is named as such.
    #[derive(Deserialize)]
    struct Header {
        benchmark: String,
        format: u32,
    }
    let h: Header = serde_json::from_str(&text).map_err(parse)?;
    if h.benchmark != benchmark || h.format != FORMAT {
        return Err(Error::Invalid {
            path,
            what: format!(
                "holds results of benchmark {:?}, format {}; expected {benchmark:?}, format {FORMAT}",
                h.benchmark, h.format
            ),
        });
    }
    let env: Envelope<T> = serde_json::from_str(&text).map_err(parse)?;
    Ok(env.data)
}

/// Seconds since the Unix epoch (when a run was made).
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The command line of this process, for the record.
pub fn command_line() -> Vec<String> {
    std::env::args().collect()
}
