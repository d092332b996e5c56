//! `--enable-pprof`: `GET /debug/pprof/profile?seconds=N` on the metrics port returns a CPU
//! profile of the whole process in pprof's protobuf format, as Go's `net/http/pprof` handler
//! the reference serves there (`go tool pprof http://…:9090/debug/pprof/profile`).
//!
//! Sampling is pprof-rs's: `SIGPROF` every 10 ms of CPU time (100 Hz, Go's rate), each sample
//! the interrupted thread's stack. Nothing runs until a profile is asked for. One profile at a
//! time (the timer is process-wide): a second request meanwhile gets 409. The wait, the
//! symbolisation and the encoding run on a blocking thread, off the runtime's workers; a
//! profile in progress ends at shutdown (503) rather than holding up the drain.
//!
//! Go's other profiles (heap, goroutine, …) have no counterpart here.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

/// Samples per second of CPU time, as Go's CPU profiler.
const FREQUENCY: i32 = 100;

/// `seconds` when the request does not say (or says something unusable), as Go.
pub const DEFAULT_SECONDS: u64 = 30;

/// The longest profile served: longer ones are refused (400), so that a request cannot keep a
/// blocking thread and the sampler busy indefinitely.
pub const MAX_SECONDS: u64 = 120;

/// Shared objects whose code the sampler does not unwind through: unwinding from a signal that
/// interrupted the C library, the unwinder or the vDSO can deadlock (pprof-rs's advice).
const BLOCKLIST: &[&str] = &["libc", "libgcc", "pthread", "vdso"];

/// Why no profile was returned.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Another profile is being taken.
    #[error("a CPU profile is already being taken")]
    Busy,
    /// The server began shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The profiler could not be created (it keeps samples in a temporary file).
    #[error("creating the CPU profiler failed (it needs a writable $TMPDIR, /tmp by default)")]
    Create,
    /// Anything else the profiler reported.
    #[error("CPU profiler: {0}")]
    Profiler(#[source] pprof::Error),
    /// The blocking task died.
    #[error("the profiling task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl From<pprof::Error> for ProfileError {
    fn from(e: pprof::Error) -> Self {
        match e {
            pprof::Error::Running => Self::Busy,
            pprof::Error::CreatingError => Self::Create,
            other => Self::Profiler(other),
        }
    }
}

/// The profile length a `seconds` query value asks for: Go's rule (absent, unparsable or not
/// positive means the default), bounded by [`MAX_SECONDS`].
pub fn seconds(query: Option<&str>) -> Result<u64, String> {
    let seconds = query
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_SECONDS, |s| s as u64);
    if seconds > MAX_SECONDS {
        return Err(format!(
            "profile duration {seconds}s exceeds the maximum of {MAX_SECONDS}s\n"
        ));
    }
    Ok(seconds)
}

/// Samples the process's CPU use for `duration` and returns the profile, pprof-encoded. Ends
/// early, with [`ProfileError::ShuttingDown`], at shutdown or when the caller stops waiting (a
/// client that went away does not keep the sampler busy).
pub async fn cpu(duration: Duration, shutdown: CancellationToken) -> Result<Vec<u8>, ProfileError> {
    let runtime = tokio::runtime::Handle::current();
    let stop = shutdown.child_token();
    // Dropped with this future: the blocking task then stops sampling.
    let _abandoned = stop.clone().drop_guard();
    let shutdown = stop;
    tokio::task::spawn_blocking(move || {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            .blocklist(BLOCKLIST)
            .build()?;
        let interrupted = runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(duration) => false,
                _ = shutdown.cancelled() => true,
            }
        });
        if interrupted {
            return Err(ProfileError::ShuttingDown);
        }
        let report = guard.report().build()?;
        // Stop sampling before the (long) encoding.
        drop(guard);
        Ok(prost::Message::encode_to_vec(&encode(&report)))
    })
    .await
    .map_err(ProfileError::Task)?
}

/// pprof's `profile.proto` (perftools.profiles), the fields written here.
pub mod proto {
    /// A profile.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        /// What each sample value is.
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        /// The samples.
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        /// Code locations.
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        /// Functions.
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        /// Every string; index 0 is "".
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        /// Start, nanoseconds since the epoch.
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        /// Length in nanoseconds.
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        /// What the period counts.
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        /// Between two samples.
        #[prost(int64, tag = "12")]
        pub period: i64,
    }

    /// A value's type and unit (string table indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        /// Type.
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        /// Unit.
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    /// One stack and its values.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Locations, leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        /// One per sample type.
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        /// Labels (the thread).
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    /// A sample label (string table indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        /// Key.
        #[prost(int64, tag = "1")]
        pub key: i64,
        /// String value.
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    /// A frame: its lines, innermost inlined function first.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        /// Id (from 1).
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// Lines.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    /// A function and line.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        /// Function id.
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        /// Line number (0 unknown).
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    /// A function (string table indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        /// Id (from 1).
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// Demangled name.
        #[prost(int64, tag = "2")]
        pub name: i64,
        /// Symbol name.
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        /// Source file.
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

#[derive(Default)]
struct Strings {
    index: HashMap<String, i64>,
    table: Vec<String>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self::default();
        s.get("");
        s
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// The report as a pprof profile with Go's CPU sample types (`samples/count`,
/// `cpu/nanoseconds`); one location per stack frame, its inlined functions as lines.
fn encode(report: &pprof::Report) -> proto::Profile {
    use proto::*;
    let period = 1_000_000_000 / i64::from(report.timing.frequency.max(1));
    let mut strings = Strings::new();
    let mut functions: HashMap<(i64, i64, i64), u64> = HashMap::new();
    let mut locations: HashMap<Vec<(u64, i64)>, u64> = HashMap::new();
    let mut profile = Profile::default();
    let thread = strings.get("thread");
    for (frames, count) in &report.data {
        let mut location_id = Vec::with_capacity(frames.frames.len());
        for frame in frames.frames.iter().filter(|f| !f.is_empty()) {
            let mut lines = Vec::with_capacity(frame.len());
            for symbol in frame {
                let key = (
                    strings.get(&symbol.name()),
                    strings.get(&symbol.sys_name()),
                    strings.get(&symbol.filename()),
                );
                let next = profile.function.len() as u64 + 1;
                let function_id = *functions.entry(key).or_insert_with(|| {
                    profile.function.push(Function {
                        id: next,
                        name: key.0,
                        system_name: key.1,
                        filename: key.2,
                    });
                    next
                });
                lines.push(Line {
                    function_id,
                    line: i64::from(symbol.lineno()),
                });
            }
            let key: Vec<(u64, i64)> = lines.iter().map(|l| (l.function_id, l.line)).collect();
            let next = profile.location.len() as u64 + 1;
            let id = *locations.entry(key).or_insert_with(|| {
                profile.location.push(Location {
                    id: next,
                    line: lines,
                });
                next
            });
            location_id.push(id);
        }
        let count = *count as i64;
        profile.sample.push(Sample {
            location_id,
            value: vec![count, count.saturating_mul(period)],
            label: vec![Label {
                key: thread,
                str: strings.get(&frames.thread_name_or_id()),
            }],
        });
    }
    let cpu = ValueType {
        r#type: strings.get("cpu"),
        unit: strings.get("nanoseconds"),
    };
    profile.sample_type = vec![
        ValueType {
            r#type: strings.get("samples"),
            unit: strings.get("count"),
        },
        cpu.clone(),
    ];
    profile.period_type = Some(cpu);
    profile.period = period;
    profile.time_nanos = report
        .timing
        .start_time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    profile.duration_nanos = report.timing.duration.as_nanos() as i64;
    profile.string_table = strings.table;
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_follow_go_and_are_bounded() {
        assert_eq!(seconds(None), Ok(30));
        assert_eq!(seconds(Some("5")), Ok(5));
        assert_eq!(seconds(Some("0")), Ok(30));
        assert_eq!(seconds(Some("-3")), Ok(30));
        assert_eq!(seconds(Some("soon")), Ok(30));
        assert_eq!(seconds(Some("120")), Ok(120));
        assert!(seconds(Some("121")).unwrap_err().contains("maximum"));
    }
}
