//! Pure decisions that the SMTP session and the delivery code share, so that
//! what a session accepts is what delivery can do: which local recipients
//! exist and which mailbox names a Maildir can hold ([`recipient`]).
//!
//! Must never do I/O: tables come in parsed (the server reads and reloads
//! the files), and every function answers from its arguments alone.
//! (The relay permission, `crate::relay::policy`, belongs here too; it stays
//! where it is until that module is next touched, to keep merges small.)

pub mod recipient;
