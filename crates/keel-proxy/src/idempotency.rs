//! A route's idempotency keys: what identifies a request (its fingerprint)
//! and how a response is kept in the store and given back.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};

/// On replayed responses.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("x-keel-idempotent-replay");

/// The request's identity under its key: method, path and query as they
/// are, and a 128-bit FNV-1a hash of the body. The hash must be the same
/// in every process and every version that shares a store, which rules out
/// std's randomly keyed hashers; it detects a client reusing a key for
/// another request, not an adversary (who could only collide with their
/// own key).
pub(crate) fn fingerprint(method: &Method, uri: &Uri, body: &[u8]) -> Vec<u8> {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut fp = Vec::with_capacity(method.as_str().len() + target.len() + 18);
    fp.extend_from_slice(method.as_str().as_bytes());
    fp.push(b' ');
    fp.extend_from_slice(target.as_bytes());
    fp.push(0);
    fp.extend_from_slice(&fnv1a_128(body).to_be_bytes());
    fp
}

fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    bytes.iter().fold(OFFSET, |hash, &b| {
        (hash ^ u128::from(b)).wrapping_mul(PRIME)
    })
}

/// A response as stored: version byte 1, status, header count, each header
/// as length-prefixed name and value, then the body.
pub(crate) fn encode(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64 * headers.len() + 8);
    out.push(1);
    out.extend_from_slice(&status.as_u16().to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.as_str().len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(body);
    out
}

/// A stored response, or `None` if `bytes` are not one.
pub(crate) fn decode(bytes: &[u8]) -> Option<(StatusCode, HeaderMap, Bytes)> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let u32_at = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("four bytes")) as usize;
    if take(1)? != [1] {
        return None;
    }
    let status = StatusCode::from_u16(u16::from_be_bytes(take(2)?.try_into().ok()?)).ok()?;
    let count = u32_at(take(4)?);
    let mut headers = HeaderMap::with_capacity(count.min(128));
    for _ in 0..count {
        let len = u32_at(take(4)?);
        let name = HeaderName::from_bytes(take(len)?).ok()?;
        let len = u32_at(take(4)?);
        let value = HeaderValue::from_bytes(take(len)?).ok()?;
        headers.append(name, value);
    }
    Some((status, headers, Bytes::copy_from_slice(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_survives_its_encoding() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let bytes = encode(StatusCode::CREATED, &headers, b"{\"id\":7}");
        let (status, back, body) = decode(&bytes).unwrap();
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(back, headers);
        assert_eq!(&body[..], b"{\"id\":7}");
        // Truncated or foreign bytes are not a response.
        for cut in 0..bytes.len() - 8 {
            assert!(decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        assert!(decode(b"\x02rest").is_none());
    }

    #[test]
    fn fingerprints_tell_requests_apart_and_are_stable() {
        let uri: Uri = "/pay/7?currency=eur".parse().unwrap();
        let a = fingerprint(&Method::POST, &uri, b"{\"amount\":42}");
        assert_eq!(a, fingerprint(&Method::POST, &uri, b"{\"amount\":42}"));
        assert_ne!(a, fingerprint(&Method::POST, &uri, b"{\"amount\":43}"));
        assert_ne!(a, fingerprint(&Method::PUT, &uri, b"{\"amount\":42}"));
        let other: Uri = "/pay/7?currency=usd".parse().unwrap();
        assert_ne!(a, fingerprint(&Method::POST, &other, b"{\"amount\":42}"));
        // The published FNV-1a 128 test vector: stable across processes.
        assert_eq!(fnv1a_128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv1a_128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }
}
