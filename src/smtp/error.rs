//! Errors of the protocol layer: one variant wherever the reply differs.

use thiserror::Error;

use crate::smtp::reply::{self, Reply};

/// Why a command line could not be turned into a [`crate::smtp::Command`].
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    #[error("command not recognized")]
    Unknown,
    #[error("command is not valid UTF-8")]
    InvalidUtf8,
    #[error("syntax error in EHLO")]
    EhloSyntax,
    #[error("syntax error in HELO")]
    HeloSyntax,
    #[error("syntax error in MAIL")]
    MailSyntax,
    #[error("syntax error in RCPT")]
    RcptSyntax,
    #[error("syntax error in BDAT")]
    BdatSyntax,
    #[error("VRFY without an argument")]
    VrfySyntax,
    #[error("command takes no parameters")]
    NoArgsAllowed,
    #[error("bad sender address")]
    BadSender,
    #[error("bad recipient address")]
    BadRecipient,
    #[error("sender address without a domain")]
    UnqualifiedSender,
    #[error("recipient address without a domain")]
    UnqualifiedRecipient,
    #[error("syntax error in AUTH")]
    AuthSyntax,
    #[error("null recipient")]
    NullRecipient,
    #[error("unknown MAIL/RCPT parameter")]
    UnknownParam,
    #[error("malformed MAIL/RCPT parameter")]
    BadParam,
}

impl ParseError {
    /// The reply RFC 5321 (4.2.2, 4.3.2) and RFC 1869 (555) call for.
    pub fn reply(self) -> Reply {
        match self {
            ParseError::Unknown => reply::UNKNOWN_COMMAND,
            ParseError::InvalidUtf8 => reply::INVALID_UTF8,
            ParseError::EhloSyntax => reply::SYNTAX_EHLO,
            ParseError::HeloSyntax => reply::SYNTAX_HELO,
            ParseError::MailSyntax => reply::SYNTAX_MAIL,
            ParseError::RcptSyntax => reply::SYNTAX_RCPT,
            ParseError::BdatSyntax => reply::SYNTAX_BDAT,
            ParseError::VrfySyntax => reply::SYNTAX_VRFY,
            ParseError::NoArgsAllowed => reply::SYNTAX_NO_ARGS,
            ParseError::BadSender => reply::BAD_SENDER_SYNTAX,
            ParseError::BadRecipient => reply::BAD_RECIPIENT_SYNTAX,
            ParseError::UnqualifiedSender => reply::BAD_SENDER_SYNTAX,
            ParseError::UnqualifiedRecipient => reply::BAD_RECIPIENT_SYNTAX,
            ParseError::AuthSyntax => crate::smtp::auth::SYNTAX,
            ParseError::NullRecipient => reply::NULL_RECIPIENT,
            ParseError::UnknownParam => reply::UNKNOWN_PARAMETER,
            ParseError::BadParam => reply::BAD_PARAMETER,
        }
    }
}
