//! `ringmta-loadgen`: a bounded SMTP load generator.
//!
//! Owns the process: parse flags, run, print the summary, write the
//! `--json` / `--html` reports and choose the exit status (0 when the run
//! completed, 1 with `--fail-on-error` if any error was counted or when the
//! run could not be carried out, 2 for bad flags).
//!
//! Module map: `reply` parses server replies, `session` is the sans-IO SMTP
//! client, `message` renders test messages, `worker` is the mio I/O driver,
//! `run` coordinates workers, `stats` measures, `report` and `html` render.

mod config;
mod html;
mod message;
mod reply;
mod report;
mod run;
mod session;
mod stats;
mod tls;
mod worker;

use anyhow::{Context, Result};
use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let args = config::Args::parse();
    match run_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringmta-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_main(args: config::Args) -> Result<ExitCode> {
    let config = Arc::new(config::Config::from_args(args)?);
    let outcome = run::run(config.clone())?;
    let report = report::Report {
        config: &config,
        outcome: &outcome,
    };
    print!("{}", report.summary());
    if let Some(path) = &config.json {
        let text =
            serde_json::to_string_pretty(&report.json()).context("encoding the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &config.html {
        std::fs::write(path, html::render(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if config.fail_on_error && outcome.totals.error_count() > 0 {
        eprintln!(
            "ringmta-loadgen: {} error(s) and --fail-on-error given",
            outcome.totals.error_count()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
