//! DANE for SMTP (RFC 7672): the DNSSEC-authenticated lookups it needs
//! (MX and TLSA, with the AD bit) and what their answers mean for one
//! connection.
//!
//! ringmta does not validate DNSSEC itself. As Postfix does, it trusts
//! the AD ("authenticated data") bit of a validating resolver: the one of
//! `--dns-server`, else the first `nameserver` of `/etc/resolv.conf`. That
//! resolver must be local (loopback: unbound, knot-resolver, BIND) and
//! validating; the path to it is not protected, so an AD bit from a
//! resolver across the network proves nothing. The queries set the AD bit
//! (RFC 6840 5.7) and EDNS DO, over UDP, then TCP when truncated.
//!
//! The lookups run on the resolver thread (`mx`), never on a shard. This
//! module must never weaken a usable TLSA RRset into opportunistic TLS:
//! what cannot be authenticated defers.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::tls::Tlsa;

/// The answer of one authenticated lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The records of the type asked for; `secure`: the resolver set AD.
    Records { secure: bool, records: Vec<RData> },
    /// No such name or no record of the type (NXDOMAIN, NODATA).
    NoRecords { secure: bool },
    /// SERVFAIL (which a validating resolver answers for bogus data),
    /// another error, or no answer in time.
    Failed(String),
}

/// What the TLSA lookup of one host means for its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dane {
    /// Usable, secure TLSA records: the certificate must match one.
    Records(Vec<Tlsa>),
    /// Secure TLSA records, none usable (RFC 7672 3.1.3): TLS is
    /// mandatory, without authentication.
    Unusable,
    /// No secure TLSA records (or an insecure zone): DANE does not apply.
    None,
    /// The lookup failed: the host must not be used (RFC 7672 2.2.3).
    Failed(String),
}

/// The TLSA owner name of `host`'s SMTP service on `port` (RFC 7672 2.2.3).
pub fn tlsa_name(host: &str, port: u16) -> String {
    format!("_{port}._tcp.{}", host.trim_end_matches('.'))
}

/// What the answer to a TLSA query means (RFC 7672 2.2).
pub fn of_tlsa(answer: Answer) -> Dane {
    match answer {
        Answer::Records {
            secure: true,
            records,
        } => {
            let usable: Vec<Tlsa> = records
                .iter()
                .filter_map(|r| match r {
                    RData::TLSA(t) => Some(Tlsa {
                        usage: t.cert_usage.into(),
                        selector: t.selector.into(),
                        matching: t.matching.into(),
                        data: t.cert_data.clone(),
                    }),
                    _ => None,
                })
                .filter(Tlsa::usable)
                .collect();
            if usable.is_empty() {
                Dane::Unusable
            } else {
                Dane::Records(usable)
            }
        }
        Answer::Records { secure: false, .. } | Answer::NoRecords { .. } => Dane::None,
        Answer::Failed(why) => Dane::Failed(why),
    }
}

/// Whether an answer is DNSSEC-secure. DANE applies only to the hosts of
/// a secure MX RRset (RFC 7672 2.2.1; a secure denial means the domain is
/// its own implicit MX, named by a secure answer too), and only to a host
/// whose address records are secure (2.2.2). `Err` when the lookup failed.
pub fn is_secure(answer: &Answer) -> Result<bool, String> {
    match answer {
        Answer::Records { secure, .. } | Answer::NoRecords { secure } => Ok(*secure),
        Answer::Failed(why) => Err(why.clone()),
    }
}

/// The biggest answer asked for over UDP (the DNS flag day 2020 value).
const UDP_PAYLOAD: u16 = 1232;

/// One query for `name`/`rtype` to `server`, asking for the AD bit, within
/// `timeout` (over UDP, then TCP when the answer is truncated).
pub async fn query(server: SocketAddr, name: &str, rtype: RecordType, timeout: Duration) -> Answer {
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    let name = match Name::from_ascii(&fqdn) {
        Ok(n) => n,
        Err(e) => return Answer::Failed(format!("{fqdn}: {e}")),
    };
    let mut msg = Message::query();
    msg.metadata.id = fastrand::u16(..);
    msg.metadata.recursion_desired = true;
    msg.metadata.authentic_data = true;
    let mut edns = Edns::new();
    edns.set_dnssec_ok(true).set_max_payload(UDP_PAYLOAD);
    msg.set_edns(edns);
    msg.add_query(Query::query(name.clone(), rtype));
    let bytes = match msg.to_vec() {
        Ok(b) => b,
        Err(e) => return Answer::Failed(format!("{fqdn}: {e}")),
    };
    let exchange = async {
        let mut reply = udp(server, &bytes, msg.metadata.id).await?;
        if reply.metadata.truncation {
            reply = tcp(server, &bytes, msg.metadata.id).await?;
        }
        Ok::<Message, std::io::Error>(reply)
    };
    let reply = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Answer::Failed(format!("{rtype} lookup of {fqdn} at {server}: {e}")),
        Err(_) => return Answer::Failed(format!("{rtype} lookup of {fqdn} at {server} timed out")),
    };
    let same_question = reply
        .queries
        .first()
        .is_some_and(|q| q.query_type() == rtype && q.name() == &name);
    if !same_question {
        return Answer::Failed(format!(
            "{rtype} lookup of {fqdn}: answer to another question"
        ));
    }
    let secure = reply.metadata.authentic_data;
    match reply.metadata.response_code {
        ResponseCode::NoError => {
            let records: Vec<RData> = reply
                .answers
                .iter()
                .filter(|r| r.record_type() == rtype)
                .map(|r| r.data.clone())
                .collect();
            if records.is_empty() {
                Answer::NoRecords { secure }
            } else {
                Answer::Records { secure, records }
            }
        }
        ResponseCode::NXDomain => Answer::NoRecords { secure },
        other => Answer::Failed(format!("{rtype} lookup of {fqdn}: {other}")),
    }
}

async fn udp(server: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Message> {
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; usize::from(UDP_PAYLOAD) + 512];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Not ours (a late answer, a spoof): keep waiting, within the timeout.
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if m.metadata.id == id {
                return Ok(m);
            }
        }
    }
}

async fn tcp(server: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Message> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    let m = Message::from_vec(&buf).map_err(std::io::Error::other)?;
    if m.metadata.id != id {
        return Err(std::io::Error::other("answer with another id"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector, TLSA};

    fn tlsa(usage: u8, selector: u8, matching: u8, len: usize) -> RData {
        RData::TLSA(TLSA::new(
            CertUsage::from(usage),
            Selector::from(selector),
            Matching::from(matching),
            vec![7; len],
        ))
    }

    #[test]
    fn tlsa_answers() {
        let secure = |records| Answer::Records {
            secure: true,
            records,
        };
        assert_eq!(
            of_tlsa(secure(vec![tlsa(3, 1, 1, 32), tlsa(1, 1, 1, 32)])),
            Dane::Records(vec![Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data: vec![7; 32]
            }])
        );
        assert_eq!(of_tlsa(secure(vec![tlsa(1, 1, 1, 32)])), Dane::Unusable);
        assert_eq!(
            of_tlsa(Answer::Records {
                secure: false,
                records: vec![tlsa(3, 1, 1, 32)]
            }),
            Dane::None
        );
        assert_eq!(of_tlsa(Answer::NoRecords { secure: true }), Dane::None);
        assert_eq!(
            of_tlsa(Answer::Failed("SERVFAIL".into())),
            Dane::Failed("SERVFAIL".into())
        );
        assert_eq!(tlsa_name("mx.example.org.", 25), "_25._tcp.mx.example.org");
        assert_eq!(is_secure(&Answer::NoRecords { secure: true }), Ok(true));
        assert!(is_secure(&Answer::Failed("x".into())).is_err());
    }
}
