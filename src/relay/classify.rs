//! Classification of the next hop's replies (`--bounce-rules FILE` over
//! built-in rules for the big providers) into classes in the style of
//! PowerMTA's and KumoMTA's bounce categories, and the action each rule
//! asks for: retry as usual, bounce at once (also on a 4xx, for an
//! unknown user), or suspend the destination for a while (throttling).
//!
//! Pure: no I/O and no clock; the rules file is read by the
//! configuration, the actions taken by `relay::deliver`.

use std::fmt;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

/// What kind of failure a reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Slow down: rate or connection limits (`421 4.7.28`, `4.7.650`...).
    Throttled,
    /// The sending address or domain has a bad reputation (blocklists).
    Reputation,
    /// Authentication or policy (DMARC, SPF, relaying refused).
    Policy,
    /// No such user or mailbox.
    BadMailbox,
    /// Mailbox full.
    QuotaIssues,
    /// The content was taken for spam.
    SpamRelated,
    /// Nothing more specific.
    Other,
}

impl Class {
    /// The class's name in the event log, the DSN and the metrics (a
    /// contract).
    pub fn name(self) -> &'static str {
        match self {
            Class::Throttled => "throttled",
            Class::Reputation => "reputation",
            Class::Policy => "policy-related",
            Class::BadMailbox => "bad-mailbox",
            Class::QuotaIssues => "quota-issues",
            Class::SpamRelated => "spam-related",
            Class::Other => "other",
        }
    }

    /// Every class, for the metrics.
    pub const ALL: [Class; 7] = [
        Class::Throttled,
        Class::Reputation,
        Class::Policy,
        Class::BadMailbox,
        Class::QuotaIssues,
        Class::SpamRelated,
        Class::Other,
    ];

    fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a rule asks ringmta to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// As the code says: 4xx retried, 5xx bounced.
    AsCoded,
    /// Bounce now, even on a 4xx.
    Bounce,
    /// Retry, and connect to this destination no more for this long.
    Suspend(Duration),
}

/// One rule: every condition given must hold.
#[derive(Debug, Clone)]
pub struct Rule {
    pub class: Class,
    /// `"421"`, `"4"` (any 4xx), `"5"`, or none: any code.
    code: Option<String>,
    /// A prefix of the enhanced status code (`"4.7.28"`, `"5.1."`).
    enhanced: Option<String>,
    text: Option<Regex>,
    pub action: Action,
}

impl Rule {
    fn matches(&self, r: &Parsed<'_>) -> bool {
        self.code.as_deref().is_none_or(|c| r.code.starts_with(c))
            && self
                .enhanced
                .as_deref()
                .is_none_or(|e| r.enhanced.is_some_and(|x| x.starts_with(e)))
            && self.text.as_ref().is_none_or(|t| t.is_match(r.text))
    }
}

/// The rules in force: the file's first, then the built-in ones.
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
}

impl Default for Classifier {
    fn default() -> Classifier {
        Classifier::builtin()
    }
}

impl PartialEq for Classifier {
    fn eq(&self, other: &Classifier) -> bool {
        self.rules.len() == other.rules.len()
    }
}

/// How long a throttling reply of the built-in rules suspends its
/// destination.
pub const BUILTIN_SUSPEND: Duration = Duration::from_secs(300);

/// The built-in rules: (class, code, enhanced, text regex, action).
/// Throttling suspends for [`BUILTIN_SUSPEND`]; unknown users bounce at
/// once when the enhanced code says so (4.1.1 is "bad destination
/// mailbox", never a passing state).
const BUILTIN: &[(Class, &str, &str, &str, &str)] = &[
    // "452 4.5.3 Too many recipients": send the rest in another
    // transaction (RFC 5321 4.5.3.1.10), no reason to slow down.
    (Class::Other, "4", "4.5.3", "", ""),
    // Greylisting asks for a retry of that message, not a pause.
    (Class::Other, "4", "", r"(?i)gr[ae]y-?list", ""),
    // Gmail: "421 4.7.28 ... unusual rate", "421 4.7.0 ... try again later".
    (Class::Throttled, "4", "4.7.28", "", "suspend"),
    // Outlook: "451 4.7.650 ... IP reputation", throttling 4.7.500-4.7.699.
    (Class::Reputation, "4", "4.7.650", "", "suspend"),
    (
        Class::Throttled,
        "4",
        "",
        r"(?i)rate limit|too many (messages|connections)|throttl|unusual rate|try again later|\[TSS?0\d\]|server busy",
        "suspend",
    ),
    // Unknown users, also when the code is 4xx.
    (Class::BadMailbox, "", "4.1.1", "", "bounce"),
    (Class::BadMailbox, "5", "5.1.1", "", ""),
    (
        Class::BadMailbox,
        "5",
        "",
        r"(?i)user unknown|no such (user|mailbox)|does not exist|recipient not found|unknown recipient|mailbox unavailable",
        "",
    ),
    (Class::QuotaIssues, "", "4.2.2", "", ""),
    (Class::QuotaIssues, "", "5.2.2", "", ""),
    (
        Class::QuotaIssues,
        "",
        "",
        r"(?i)over quota|quota exceeded|mailbox (is )?full|insufficient storage",
        "",
    ),
    // Outlook "5.7.606-649 banned sending IP", Yahoo [BL21], blocklists.
    (Class::Reputation, "5", "5.7.6", "", ""),
    (
        Class::Reputation,
        "",
        "",
        r"(?i)spamhaus|blocklist|blacklist|block list|\[BL\d+\]|reputation|poor reputation",
        "",
    ),
    (
        Class::Policy,
        "",
        "",
        r"(?i)dmarc|spf|dkim|not authenticated|relay(ing)? (denied|not permitted|access denied)|5\.7\.2[3-9]",
        "",
    ),
    (Class::Policy, "", "5.7.26", "", ""),
    (
        Class::SpamRelated,
        "",
        "",
        r"(?i)spam|junk|unsolicited|content rejected|message (was )?(rejected|blocked)",
        "",
    ),
];

impl Classifier {
    /// The built-in rules alone.
    pub fn builtin() -> Classifier {
        let rules = BUILTIN
            .iter()
            .map(|&(class, code, enhanced, text, action)| Rule {
                class,
                code: (!code.is_empty()).then(|| code.to_owned()),
                enhanced: (!enhanced.is_empty()).then(|| enhanced.to_owned()),
                // invariant: the built-in regexes compile (unit test).
                text: (!text.is_empty()).then(|| Regex::new(text).expect("built-in regex")),
                action: match action {
                    "suspend" => Action::Suspend(BUILTIN_SUSPEND),
                    "bounce" => Action::Bounce,
                    _ => Action::AsCoded,
                },
            })
            .collect();
        Classifier { rules }
    }

    /// The TOML text of a `--bounce-rules` file (its `[[rule]]`s first,
    /// then the built-in ones).
    pub fn parse(text: &str) -> Result<Classifier, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Vec::with_capacity(file.rule.len() + BUILTIN.len());
        for (i, r) in file.rule.into_iter().enumerate() {
            let at = format!("rule {}", i + 1);
            let class = Class::parse(&r.class).ok_or_else(|| {
                format!(
                    "{at}: class {:?} is not one of {}",
                    r.class,
                    Class::ALL.map(Class::name).join(", ")
                )
            })?;
            if let Some(c) = &r.code {
                if c.is_empty() || c.len() > 3 || !c.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{at}: code {c:?}: 1 to 3 digits (\"421\", \"4\")"));
                }
            }
            let text = r
                .text
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| format!("{at}: text: {e}"))?;
            let action = match (r.bounce, r.suspend.as_deref()) {
                (true, Some(_)) => {
                    return Err(format!("{at}: bounce and suspend exclude each other"))
                }
                (true, None) => Action::Bounce,
                (false, Some(d)) => Action::Suspend(
                    crate::cli::parse_duration(d).map_err(|e| format!("{at}: suspend: {e}"))?,
                ),
                (false, None) => Action::AsCoded,
            };
            rules.push(Rule {
                class,
                code: r.code,
                enhanced: r.enhanced,
                text,
                action,
            });
        }
        rules.extend(Classifier::builtin().rules);
        Ok(Classifier { rules })
    }

    /// Reads and parses a `--bounce-rules` file.
    pub fn load(path: &std::path::Path) -> Result<Classifier, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Classifier::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The class of a reply (`"421 4.7.28 text"`) and what to do: the
    /// first rule that matches decides; none: [`Class::Other`], as coded.
    pub fn classify(&self, reply: &str) -> (Class, Action) {
        let parsed = Parsed::of(reply);
        self.rules
            .iter()
            .find(|r| r.matches(&parsed))
            .map_or((Class::Other, Action::AsCoded), |r| (r.class, r.action))
    }
}

/// A reply split into code, enhanced code and text.
struct Parsed<'a> {
    code: &'a str,
    enhanced: Option<&'a str>,
    text: &'a str,
}

impl<'a> Parsed<'a> {
    fn of(reply: &'a str) -> Parsed<'a> {
        let reply = reply.trim_start();
        let (code, rest) = match reply.get(..3) {
            Some(c) if c.bytes().all(|b| b.is_ascii_digit()) => (c, &reply[3..]),
            _ => ("", reply),
        };
        let rest = rest.trim_start_matches([' ', '-']);
        let (first, after) = rest.split_once(' ').unwrap_or((rest, ""));
        let is_enhanced = first.split('.').count() == 3
            && first
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if is_enhanced {
            Parsed {
                code,
                enhanced: Some(first),
                text: after,
            }
        } else {
            Parsed {
                code,
                enhanced: None,
                text: rest,
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<FileRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    class: String,
    code: Option<String>,
    enhanced: Option<String>,
    text: Option<String>,
    #[serde(default)]
    bounce: bool,
    suspend: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_providers_replies_are_classified() {
        let c = Classifier::builtin();
        let cases = [
            (
                "421 4.7.28 [1.2.3.4] Our system has detected an unusual rate of unsolicited mail",
                Class::Throttled,
            ),
            ("421 4.7.0 [TSS04] Messages from 1.2.3.4 temporarily deferred", Class::Throttled),
            ("451 4.7.650 The mail server [1.2.3.4] has been temporarily rate limited due to IP reputation", Class::Reputation),
            ("550 5.1.1 The email account that you tried to reach does not exist", Class::BadMailbox),
            ("450 4.1.1 <u@x>: Recipient address rejected: User unknown", Class::BadMailbox),
            ("552 5.2.2 The email account that you tried to reach is over quota", Class::QuotaIssues),
            ("550 5.7.606 Access denied, banned sending IP [1.2.3.4]", Class::Reputation),
            ("553 5.7.1 [BL21] Connections will not be accepted from 1.2.3.4", Class::Reputation),
            ("550 5.7.26 Unauthenticated email from x is not accepted due to domain's DMARC policy", Class::Policy),
            ("550 5.7.1 Message rejected as spam", Class::SpamRelated),
            ("451 4.3.0 local error", Class::Other),
            ("450 4.2.0 Greylisted, please try again later", Class::Other),
            ("452 4.5.3 Error: too many recipients", Class::Other),
        ];
        for (reply, want) in cases {
            assert_eq!(c.classify(reply).0, want, "{reply}");
        }
        assert_eq!(
            c.classify("450 4.1.1 user unknown").1,
            Action::Bounce,
            "unknown user bounces at once on 4xx"
        );
        assert!(matches!(
            c.classify("421 4.7.28 rate limited").1,
            Action::Suspend(_)
        ));
        assert_eq!(c.classify("550 5.1.1 no").1, Action::AsCoded);
    }

    #[test]
    fn file_rules_come_first_and_bad_ones_are_refused() {
        let c = Classifier::parse(
            "[[rule]]\nclass = \"throttled\"\ncode = \"4\"\ntext = \"(?i)slow down\"\nsuspend = \"3s\"\n",
        )
        .unwrap();
        assert_eq!(
            c.classify("450 4.2.0 please slow down"),
            (Class::Throttled, Action::Suspend(Duration::from_secs(3)))
        );
        assert_eq!(c.classify("550 5.1.1 x").0, Class::BadMailbox);
        for bad in [
            "[[rule]]\nclass = \"nope\"",
            "[[rule]]\nclass = \"other\"\ncode = \"4xx\"",
            "[[rule]]\nclass = \"other\"\ntext = \"(\"",
            "[[rule]]\nclass = \"other\"\nbounce = true\nsuspend = \"1m\"",
            "[[rule]]\nclass = \"other\"\nsuspend = \"soon\"",
            "[[rule]]\nclass = \"other\"\ncolour = \"red\"",
        ] {
            assert!(Classifier::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_without_enhanced_code_or_code_are_parsed() {
        let p = Parsed::of("421 too many connections");
        assert_eq!(
            (p.code, p.enhanced, p.text),
            ("421", None, "too many connections")
        );
        let p = Parsed::of("garbage");
        assert_eq!((p.code, p.enhanced), ("", None));
        assert_eq!(
            Classifier::builtin().classify("421 too many connections").0,
            Class::Throttled
        );
    }
}
