//! Pure decisions that the SMTP session, the connection glue and the
//! delivery code share, so that what a session accepts is what delivery can
//! do: which local recipients exist and which mailbox names a Maildir can
//! hold ([`recipient`]), and who may relay ([`relay`]: client networks, and
//! the local-part spellings that would open a relay through a local domain),
//! and the arithmetic of rate limits over time ([`rate`]: per client network
//! and per user, per minute, in a bounded table).
//!
//! Must never do I/O: tables come in parsed (the server reads and reloads
//! the files), and every function answers from its arguments alone.

pub mod rate;
pub mod recipient;
pub mod relay;
