//! The task-spec flags of `service create` and `service update`, in docker's forms: durations
//! (`1m30s`), `--env`, `--update-*`, `--health-*`; and how `service update` merges them over the
//! service's current update config and health check.

use std::collections::BTreeMap;

use anyhow::bail;
use clap::Args;
use proto::excerpt;
use proto::model::{FailureAction, HealthCheck, HealthTest, Ratio, UpdateConfig, UpdateOrder};

/// A Go duration as docker takes it (`10s`, `500ms`, `1m30s`, `1.5h`, `0s`), in milliseconds,
/// the precision the manager keeps. Go also takes a bare `0`; any other bare number is
/// refused, since whether 10 means seconds or milliseconds is a guess.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    const UNITS: [(&str, u128); 7] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let bad = |why: &str| format!("invalid duration {:?}: {why}", excerpt(text));
    if text == "0" {
        return Ok(0);
    }
    if text.starts_with('-') {
        return Err(bad("it must not be negative"));
    }
    if text.is_empty() {
        return Err(bad(
            "expected a number with a unit, e.g. 10s, 500ms, 1m30s or 2h",
        ));
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(bad(
                "a number needs a unit (ms, s, m or h), e.g. 10s, 500ms, 1m30s or 2h",
            ));
        }
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(bad(&format!(
                "unknown unit {:?}: use ms, s, m or h",
                excerpt(unit)
            )));
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(bad("expected a number with a unit, e.g. 10s or 1.5s"));
        }
        let too_long = || bad("too long");
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_long())?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(too_long)?;
        // Digits past the unit's nanosecond precision cannot count; Go drops them too.
        let mut place = scale;
        for digit in fraction.bytes() {
            place /= 10;
            part = part.saturating_add(u128::from(digit - b'0') * place);
        }
        nanos = nanos.checked_add(part).ok_or_else(too_long)?;
        rest = after;
    }
    if nanos % 1_000_000 != 0 {
        return Err(bad("finer than a millisecond"));
    }
    u64::try_from(nanos / 1_000_000).map_err(|_| bad("too long"))
}

/// Milliseconds as Go's `time.Duration` prints them, as docker shows durations: `0s`, `500ms`,
/// `1.5s`, `1m30s`, `2h0m0s`.
pub fn format_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let frac = format!("{frac:03}");
        format!("{s}.{}s", frac.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// `--env KEY=VALUE`; the value may be empty or hold more `=`.
pub fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!(
            "invalid environment variable {:?}: expected KEY=VALUE",
            excerpt(text)
        )),
    }
}

/// Pairs of a repeatable KEY=VALUE flag as a map, refusing a key given twice: which value was
/// meant is a guess. `what` names the kind of key in the error ("label", "env").
pub fn unique_map(
    what: &str,
    pairs: Vec<(String, String)>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (key, value) in pairs {
        if map.contains_key(&key) {
            bail!("{what} {} is given more than once", excerpt(&key));
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// A command line split as a POSIX shell splits it (quotes and backslashes), for `--args` and
/// `--command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Argv(pub Vec<String>);

pub fn parse_argv(text: &str) -> Result<Argv, String> {
    shlex::split(text).map(Argv).ok_or_else(|| {
        format!(
            "invalid command line {:?}: a quote is not closed or it ends in a backslash",
            excerpt(text)
        )
    })
}

/// `--health-http PORT[/PATH]`, e.g. `8080/healthz`; the path defaults to `/`.
pub fn parse_health_http(text: &str) -> Result<HealthTest, String> {
    let (port, path) = match text.find('/') {
        Some(i) => text.split_at(i),
        None => (text, "/"),
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(format!(
                "invalid HTTP health check {:?}: expected PORT[/PATH] with a port from 1 to \
                 65535, e.g. 8080/healthz",
                excerpt(text)
            ))
        }
    };
    // The path goes into the request line as it is.
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid HTTP health check {:?}: the path has a space or control character",
            excerpt(text)
        ));
    }
    Ok(HealthTest::Http {
        port,
        path: path.to_string(),
    })
}

fn parse_order(text: &str) -> Result<UpdateOrder, String> {
    match text {
        "stop-first" => Ok(UpdateOrder::StopFirst),
        "start-first" => Ok(UpdateOrder::StartFirst),
        _ => Err(format!(
            "invalid update order {:?}: expected stop-first or start-first",
            excerpt(text)
        )),
    }
}

fn parse_failure_action(text: &str) -> Result<FailureAction, String> {
    match text {
        "pause" => Ok(FailureAction::Pause),
        "continue" => Ok(FailureAction::Continue),
        "rollback" => Ok(FailureAction::Rollback),
        _ => Err(format!(
            "invalid failure action {:?}: expected pause, continue or rollback",
            excerpt(text)
        )),
    }
}

fn parse_ratio(text: &str) -> Result<Ratio, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(Ratio(r)),
        _ => Err(format!(
            "invalid ratio {:?}: expected a number from 0 to 1, e.g. 0.25",
            excerpt(text)
        )),
    }
}

/// `--update-*`: each flag given replaces that field of the service's update config.
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Rolling update")]
pub struct UpdateConfigArgs {
    /// Tasks replaced at once; 0 replaces them all at once (default 1)
    #[arg(
        long = "update-parallelism",
        id = "update_parallelism",
        value_name = "N"
    )]
    pub parallelism: Option<u64>,
    /// Wait between replacing one batch of tasks and the next, e.g. 10s (default 0s)
    #[arg(long = "update-delay", id = "update_delay", value_name = "DURATION", value_parser = parse_duration)]
    pub delay: Option<u64>,
    /// stop-first: the old task stops before its replacement starts; start-first: the
    /// replacement starts first, and the old task stops once it is up (default stop-first)
    #[arg(long = "update-order", id = "update_order", value_name = "ORDER", value_parser = parse_order)]
    pub order: Option<UpdateOrder>,
    /// How long a new task must stay up (and healthy, with a health check) to count as
    /// updated (default 5s)
    #[arg(long = "update-monitor", id = "update_monitor", value_name = "DURATION", value_parser = parse_duration)]
    pub monitor: Option<u64>,
    /// What an update does when new tasks fail: pause, continue or rollback (default pause)
    #[arg(long = "update-failure-action", id = "update_failure_action", value_name = "ACTION", value_parser = parse_failure_action)]
    pub failure_action: Option<FailureAction>,
    /// Failed tasks tolerated, as a fraction from 0 to 1 of the tasks replaced (default 0)
    #[arg(long = "update-max-failure-ratio", id = "update_max_failure_ratio", value_name = "RATIO", value_parser = parse_ratio)]
    pub max_failure_ratio: Option<Ratio>,
}

impl UpdateConfigArgs {
    /// `base` with the flags given over it; None when no flag is given.
    pub fn merge(&self, base: &UpdateConfig) -> Option<UpdateConfig> {
        let given = self.parallelism.is_some()
            || self.delay.is_some()
            || self.order.is_some()
            || self.monitor.is_some()
            || self.failure_action.is_some()
            || self.max_failure_ratio.is_some();
        given.then(|| UpdateConfig {
            parallelism: self.parallelism.unwrap_or(base.parallelism),
            delay_ms: self.delay.unwrap_or(base.delay_ms),
            order: self.order.unwrap_or(base.order),
            monitor_ms: self.monitor.unwrap_or(base.monitor_ms),
            failure_action: self.failure_action.unwrap_or(base.failure_action),
            max_failure_ratio: self.max_failure_ratio.unwrap_or(base.max_failure_ratio),
        })
    }
}

/// A duration that must not be zero: a check every 0s, or one that may take 0s, is a mistake.
fn parse_positive_duration(text: &str) -> Result<u64, String> {
    match parse_duration(text)? {
        0 => Err(format!(
            "invalid duration {:?}: it must be more than 0s",
            excerpt(text)
        )),
        ms => Ok(ms),
    }
}

fn parse_retries(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "invalid retry count {:?}: expected a whole number from 1",
            excerpt(text)
        )),
    }
}

/// `--health-*`: a test, and its timing over the current check's (or docker's defaults).
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Health check")]
pub struct HealthArgs {
    /// Command that checks a task's health, run with /bin/sh -c inside the task's namespaces;
    /// exit status 0 is healthy. A task gets traffic once healthy and is replaced when unhealthy
    #[arg(
        long = "health-cmd",
        id = "health_cmd",
        value_name = "CMD",
        conflicts_with = "health_http"
    )]
    pub cmd: Option<String>,
    /// Check health with GET http://127.0.0.1:PORT/PATH inside the task (2xx or 3xx is
    /// healthy), e.g. 8080/healthz; PATH defaults to /
    #[arg(long = "health-http", id = "health_http", value_name = "PORT[/PATH]", value_parser = parse_health_http)]
    pub http: Option<HealthTest>,
    /// Time between checks (default 30s)
    #[arg(long = "health-interval", id = "health_interval", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub interval: Option<u64>,
    /// A check that takes longer fails (default 30s)
    #[arg(long = "health-timeout", id = "health_timeout", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub timeout: Option<u64>,
    /// Failures in a row that make a task unhealthy (default 3)
    #[arg(long = "health-retries", id = "health_retries", value_name = "N", value_parser = parse_retries)]
    pub retries: Option<u32>,
    /// Failures within this time after a task starts do not count (default 0s)
    #[arg(long = "health-start-period", id = "health_start_period", value_name = "DURATION", value_parser = parse_duration)]
    pub start_period: Option<u64>,
}

impl HealthArgs {
    /// Whether any `--health-*` flag is given.
    pub fn any(&self) -> bool {
        self.cmd.is_some()
            || self.http.is_some()
            || self.interval.is_some()
            || self.timeout.is_some()
            || self.retries.is_some()
            || self.start_period.is_some()
    }

    /// The check the flags make over `current`: a new test keeps the current timing, timing
    /// flags alone change the current check. None when no flag is given; an error for timing
    /// flags with neither a test nor a current check.
    pub fn merge(&self, current: Option<&HealthCheck>) -> anyhow::Result<Option<HealthCheck>> {
        if !self.any() {
            return Ok(None);
        }
        let test = match (&self.cmd, &self.http) {
            (Some(cmd), _) => Some(HealthTest::Cmd {
                argv: vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
            }),
            (None, Some(http)) => Some(http.clone()),
            (None, None) => None,
        };
        let mut check = match (test, current) {
            (Some(test), Some(current)) => HealthCheck {
                test,
                ..current.clone()
            },
            (Some(test), None) => HealthCheck::new(test),
            (None, Some(current)) => current.clone(),
            (None, None) => bail!(
                "--health-interval, --health-timeout, --health-retries and --health-start-period \
                 need a health check: give --health-cmd or --health-http"
            ),
        };
        if let Some(ms) = self.interval {
            check.interval_ms = ms;
        }
        if let Some(ms) = self.timeout {
            check.timeout_ms = ms;
        }
        if let Some(n) = self.retries {
            check.retries = n;
        }
        if let Some(ms) = self.start_period {
            check.start_period_ms = ms;
        }
        Ok(Some(check))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_go_form() {
        for (text, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1m30s", 90_000),
            ("2h", 7_200_000),
            ("0s", 0),
            ("0", 0),
            ("1.5s", 1_500),
            (".5m", 30_000),
            ("1h1m1s1ms", 3_661_001),
            ("1000us", 1),
            ("2000000ns", 2),
        ] {
            assert_eq!(parse_duration(text), Ok(ms), "{text}");
        }
        for (text, why) in [
            ("10", "a number needs a unit"),
            ("1m30", "a number needs a unit"),
            ("", "expected a number with a unit"),
            ("s", "expected a number with a unit"),
            ("1.2.3s", "expected a number with a unit"),
            ("10d", "unknown unit \"d\""),
            ("-1s", "must not be negative"),
            ("1 s", "unknown unit \" s\""),
            ("1.0005s", "finer than a millisecond"),
            ("1us", "finer than a millisecond"),
            ("99999999999999999999999999999999999999999h", "too long"),
            ("9999999999999999999h", "too long"),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn durations_print_like_go() {
        for (ms, text) in [
            (0, "0s"),
            (500, "500ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (1_050, "1.05s"),
            (90_000, "1m30s"),
            (7_200_000, "2h0m0s"),
            (3_661_001, "1h1m1.001s"),
        ] {
            assert_eq!(format_duration(ms), text, "{ms}");
            assert_eq!(parse_duration(text), Ok(ms), "{text} parses back");
        }
    }

    #[test]
    fn command_lines_split_like_a_shell() {
        let split = |text: &str| parse_argv(text).map(|a| a.0);
        assert_eq!(
            split(r#"--port 8080 --name "a b" 'c d' e\ f"#).unwrap(),
            ["--port", "8080", "--name", "a b", "c d", "e f"]
        );
        assert_eq!(split("").unwrap(), Vec::<String>::new());
        assert_eq!(split(r#""""#).unwrap(), [""]);
        for bad in [r#"--name "a b"#, "'x", "x\\"] {
            let err = split(bad).unwrap_err();
            assert!(err.contains("a quote is not closed"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_and_http_checks_parse() {
        assert_eq!(parse_env("A=1=2"), Ok(("A".into(), "1=2".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("A").unwrap_err().contains("expected KEY=VALUE"));
        assert!(parse_env("=1").is_err());
        let http = |port, path: &str| HealthTest::Http {
            port,
            path: path.into(),
        };
        assert_eq!(
            parse_health_http("8080/healthz"),
            Ok(http(8080, "/healthz"))
        );
        assert_eq!(parse_health_http("8080"), Ok(http(8080, "/")));
        assert_eq!(parse_health_http("80/a/b?x=1"), Ok(http(80, "/a/b?x=1")));
        for bad in ["0/x", "/healthz", "http://x/", "8080/a b", "70000"] {
            assert!(parse_health_http(bad).is_err(), "{bad}");
        }
        let twice = vec![("A".to_string(), "1".to_string()), ("A".into(), "2".into())];
        assert_eq!(
            unique_map("env", twice).unwrap_err().to_string(),
            "env A is given more than once"
        );
    }

    #[test]
    fn update_flags_merge_over_the_current_config() {
        assert_eq!(
            UpdateConfigArgs::default().merge(&UpdateConfig::default()),
            None
        );
        let current = UpdateConfig {
            parallelism: 2,
            delay_ms: 10_000,
            ..UpdateConfig::default()
        };
        let args = UpdateConfigArgs {
            order: Some(UpdateOrder::StartFirst),
            max_failure_ratio: Some(Ratio(0.5)),
            ..UpdateConfigArgs::default()
        };
        assert_eq!(
            args.merge(&current),
            Some(UpdateConfig {
                order: UpdateOrder::StartFirst,
                max_failure_ratio: Ratio(0.5),
                ..current
            })
        );
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("NaN").is_err());
        assert_eq!(parse_ratio("1"), Ok(Ratio(1.0)));
        assert!(parse_order("rolling").unwrap_err().contains("stop-first"));
        assert!(parse_failure_action("stop")
            .unwrap_err()
            .contains("rollback"));
    }

    #[test]
    fn health_flags_make_or_change_a_check() {
        assert_eq!(HealthArgs::default().merge(None).unwrap(), None);
        let cmd = HealthArgs {
            cmd: Some("curl -f localhost:8080 || exit 1".into()),
            retries: Some(5),
            ..HealthArgs::default()
        };
        let made = cmd.merge(None).unwrap().unwrap();
        assert_eq!(
            made.test,
            HealthTest::Cmd {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "curl -f localhost:8080 || exit 1".into()
                ]
            }
        );
        assert_eq!((made.retries, made.interval_ms), (5, 30_000));
        // Timing alone changes the current check; a new test keeps the current timing.
        let timing = HealthArgs {
            interval: Some(5_000),
            start_period: Some(2_000),
            ..HealthArgs::default()
        };
        let changed = timing.merge(Some(&made)).unwrap().unwrap();
        assert_eq!(
            changed,
            HealthCheck {
                interval_ms: 5_000,
                start_period_ms: 2_000,
                ..made.clone()
            }
        );
        let http = HealthArgs {
            http: Some(parse_health_http("8080/healthz").unwrap()),
            ..HealthArgs::default()
        };
        let replaced = http.merge(Some(&changed)).unwrap().unwrap();
        assert_eq!(replaced.interval_ms, 5_000);
        assert!(matches!(replaced.test, HealthTest::Http { port: 8080, .. }));
        let err = timing.merge(None).unwrap_err().to_string();
        assert!(err.contains("give --health-cmd or --health-http"), "{err}");
        assert!(parse_positive_duration("0s")
            .unwrap_err()
            .contains("more than 0s"));
        assert_eq!(parse_retries("2"), Ok(2));
        assert!(parse_retries("0").unwrap_err().contains("from 1"));
    }
}
