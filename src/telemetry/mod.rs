//! Logging: tracing to stderr, quiet by rank (STYLE habit 15).
//!
//! Rank 0 logs at the configured level; other ranks log warnings and errors
//! only, unless `log.ranks = "all"`. Every event is emitted inside the root
//! span `sfron{rank=N}` that [`init`] returns, so text lines and JSON records
//! carry the rank. Threads spawned later should enter that span (or a child).
//! stdout is left to command output (reports, `--dry-run`).

use tracing::Level;
use tracing_subscriber::filter::LevelFilter;

use crate::config::raw::{LogFormat, LogLevel, LogRanks, LogSection};

/// The level this rank logs at.
pub fn rank_level(log: &LogSection, rank: usize) -> Level {
    let configured = match log.level {
        LogLevel::Error => Level::ERROR,
        LogLevel::Warn => Level::WARN,
        LogLevel::Info => Level::INFO,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Trace => Level::TRACE,
    };
    if rank == 0 || log.ranks == LogRanks::All {
        configured
    } else {
        configured.min(Level::WARN)
    }
}

/// Installs the global subscriber and returns the root span to enter.
/// Calling it twice keeps the first subscriber (tests may do so).
pub fn init(log: &LogSection, rank: usize) -> tracing::Span {
    let filter = LevelFilter::from_level(rank_level(log, rank));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    tracing::info_span!("sfron", rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rank_zero_is_chatty_by_default() {
        let log = LogSection::default();
        assert_eq!(rank_level(&log, 0), Level::INFO);
        assert_eq!(rank_level(&log, 3), Level::WARN);
        let all = LogSection {
            ranks: LogRanks::All,
            level: LogLevel::Debug,
            ..LogSection::default()
        };
        assert_eq!(rank_level(&all, 3), Level::DEBUG);
        let quiet = LogSection {
            level: LogLevel::Error,
            ..LogSection::default()
        };
        assert_eq!(rank_level(&quiet, 1), Level::ERROR);
    }
}
