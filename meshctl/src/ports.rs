//! Published ports on the command line, in docker's forms: `80:8080[/udp]` and
//! `mode=host,published=80,target=8080,protocol=udp`.

use std::collections::BTreeSet;

use proto::api::PublishedPort;
use proto::excerpt;
use proto::model::{PortConfig, Protocol, PublishMode};

fn parse_port(what: &str, text: &str, whole: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "invalid publish {:?}: {what} port {:?} must be a number from 1 to 65535",
            excerpt(whole),
            excerpt(text)
        )),
    }
}

fn parse_protocol(text: &str, whole: &str) -> Result<Protocol, String> {
    text.parse().map_err(|()| {
        format!(
            "invalid publish {:?}: protocol {:?} must be tcp or udp",
            excerpt(whole),
            excerpt(text)
        )
    })
}

/// The port of `meshctl publish`, and whether its long form named the mode (then `--mode` too
/// would be the key given twice).
#[derive(Debug, Clone)]
pub struct PublishArg {
    pub port: PortConfig,
    pub mode_given: bool,
}

pub fn parse_publish_arg(text: &str) -> Result<PublishArg, String> {
    let port = parse_publish(text)?;
    let mode_given = text
        .split(',')
        .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == "mode"));
    Ok(PublishArg { port, mode_given })
}

/// `--publish`: `P:T[/tcp|udp]` (ingress mode) or docker's long form, where `published` and
/// `target` are required and `mode` (ingress) and `protocol` (tcp) have defaults.
pub fn parse_publish(text: &str) -> Result<PortConfig, String> {
    if text.contains('=') {
        return parse_long(text);
    }
    let (ports, protocol) = match text.split_once('/') {
        Some((ports, proto)) => (ports, parse_protocol(proto, text)?),
        None => (text, Protocol::Tcp),
    };
    let (published, target) = ports.split_once(':').ok_or_else(|| {
        format!("invalid publish {:?}: expected PUBLISHED:TARGET[/tcp|udp] or mode=...,published=...,target=...", excerpt(text))
    })?;
    Ok(PortConfig {
        protocol,
        published: parse_port("published", published, text)?,
        target: parse_port("target", target, text)?,
        mode: PublishMode::Ingress,
    })
}

fn parse_long(text: &str) -> Result<PortConfig, String> {
    let whole = excerpt(text);
    let (mut mode, mut protocol) = (PublishMode::Ingress, Protocol::Tcp);
    let (mut published, mut target) = (None, None);
    let mut seen = BTreeSet::new();
    for field in text.split(',') {
        let (key, value) = field.split_once('=').ok_or_else(|| {
            format!(
                "invalid publish {whole:?}: {:?} is not KEY=VALUE",
                excerpt(field)
            )
        })?;
        // Docker would silently take the last; which one the user meant is a guess.
        if !seen.insert(key) {
            return Err(format!(
                "invalid publish {whole:?}: {:?} is given more than once",
                excerpt(key)
            ));
        }
        match key {
            "mode" => {
                mode = match value {
                    "ingress" => PublishMode::Ingress,
                    "host" => PublishMode::Host,
                    _ => {
                        return Err(format!(
                            "invalid publish {whole:?}: mode {:?} must be ingress or host",
                            excerpt(value)
                        ))
                    }
                }
            }
            "published" => published = Some(parse_port("published", value, text)?),
            "target" => target = Some(parse_port("target", value, text)?),
            "protocol" => protocol = parse_protocol(value, text)?,
            _ => {
                return Err(format!(
                    "invalid publish {whole:?}: unknown field {:?} (expected mode, published, target, protocol)",
                    excerpt(key)
                ))
            }
        }
    }
    let missing = |what: &str| format!("invalid publish {whole:?}: {what}=PORT is required");
    Ok(PortConfig {
        protocol,
        published: published.ok_or_else(|| missing("published"))?,
        target: target.ok_or_else(|| missing("target"))?,
        mode,
    })
}

/// `--publish-rm` and `publish rm`: `P[/tcp|udp]`, tcp by default.
pub fn parse_unpublish(text: &str) -> Result<PublishedPort, String> {
    let (port, protocol) = match text.split_once('/') {
        Some((port, proto)) => (port, parse_protocol(proto, text)?),
        None => (text, Protocol::Tcp),
    };
    Ok(PublishedPort {
        protocol,
        published: parse_port("published", port, text)?,
    })
}

pub fn mode_word(m: PublishMode) -> &'static str {
    match m {
        PublishMode::Ingress => "ingress",
        PublishMode::Host => "host",
    }
}

/// As docker's `service ls` shows a port: `*:80->8080/tcp`.
pub fn short(p: &PortConfig) -> String {
    format!("*:{}->{}/{}", p.published, p.target, p.protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(published: u16, target: u16, protocol: Protocol, mode: PublishMode) -> PortConfig {
        PortConfig {
            protocol,
            published,
            target,
            mode,
        }
    }

    #[test]
    fn short_form() {
        use {Protocol::*, PublishMode::*};
        assert_eq!(parse_publish("80:8080"), Ok(port(80, 8080, Tcp, Ingress)));
        assert_eq!(
            parse_publish("53:5353/udp"),
            Ok(port(53, 5353, Udp, Ingress))
        );
        assert_eq!(
            parse_publish("8080:80/tcp"),
            Ok(port(8080, 80, Tcp, Ingress))
        );
        for (bad, why) in [
            ("80", "expected PUBLISHED:TARGET"),
            ("80:", "target port \"\""),
            (":80", "published port \"\""),
            (
                "0:80",
                "published port \"0\" must be a number from 1 to 65535",
            ),
            ("80:70000", "target port \"70000\""),
            ("80:8080/sctp", "protocol \"sctp\" must be tcp or udp"),
            ("a:b", "published port \"a\""),
        ] {
            let err = parse_publish(bad).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid publish {bad:?}")),
                "{err}"
            );
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn long_form() {
        use {Protocol::*, PublishMode::*};
        assert_eq!(
            parse_publish("mode=host,published=81,target=8080,protocol=udp"),
            Ok(port(81, 8080, Udp, Host))
        );
        assert_eq!(
            parse_publish("published=80,target=8080"),
            Ok(port(80, 8080, Tcp, Ingress))
        );
        assert_eq!(
            parse_publish("target=8080,mode=ingress,published=80"),
            Ok(port(80, 8080, Tcp, Ingress))
        );
        for (bad, why) in [
            ("published=80", "target=PORT is required"),
            ("target=80", "published=PORT is required"),
            ("mode=bridge,published=80,target=80", "mode \"bridge\""),
            (
                "published=80,target=80,proto=tcp",
                "unknown field \"proto\"",
            ),
            ("published=80,target=80,protocol=icmp", "protocol \"icmp\""),
            ("published=80,target", "\"target\" is not KEY=VALUE"),
            (
                "published=83,published=84,target=8080",
                "\"published\" is given more than once",
            ),
            (
                "mode=host,published=80,target=80,mode=ingress",
                "\"mode\" is given more than once",
            ),
            (
                "protocol=udp,published=80,target=80,protocol=udp",
                "\"protocol\" is given more than once",
            ),
            (
                "published=80,target=80,target=81",
                "\"target\" is given more than once",
            ),
        ] {
            let err = parse_publish(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn errors_quote_an_excerpt_of_a_huge_flag() {
        let huge = format!("published=80,target={}", "9".repeat(10_000));
        let err = parse_publish(&huge).unwrap_err();
        assert!(err.len() < 300, "{} bytes", err.len());
        assert!(err.contains("…(10020 bytes)"), "{err}");
    }

    #[test]
    fn unpublish_and_display() {
        assert_eq!(
            parse_unpublish("80"),
            Ok(PublishedPort {
                protocol: Protocol::Tcp,
                published: 80
            })
        );
        assert_eq!(parse_unpublish("53/udp").unwrap().to_string(), "53/udp");
        assert!(parse_unpublish("80:8080").is_err());
        assert!(parse_unpublish("0").is_err());
        assert_eq!(
            short(&port(80, 8080, Protocol::Tcp, PublishMode::Ingress)),
            "*:80->8080/tcp"
        );
    }
}
