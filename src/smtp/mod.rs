//! The SMTP protocol, sans-IO: bytes and `Instant`s in, replies and events
//! out. Nothing here opens a socket, a file or reads a clock, which is what
//! makes it testable byte by byte and fuzzable.

pub mod auth;
pub mod command;
pub mod data;
pub mod envelope;
pub mod error;
pub mod field;
pub mod inject;
pub mod parse;
pub mod proxy;
pub mod reply;
pub mod session;
pub mod submit;

pub use command::Command;
pub use envelope::{Envelope, Message, TlsInfo};
pub use error::ParseError;
pub use session::{CommitResult, ConnInfo, Event, Mode, Session, SessionConfig};
