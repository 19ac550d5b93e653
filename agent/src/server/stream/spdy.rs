//! SPDY/3.1 framing: the frames the API server's streaming client (moby/spdystream over
//! golang.org/x/net/spdy's framer) exchanges with a node, and the zlib header compression with
//! the SPDY/3 dictionary. Pure: bytes in, frames out, and back; the session that drives a
//! connection is in `session`.
//!
//! Written by hand because no maintained Rust crate speaks SPDY/3.1 (it was superseded by
//! HTTP/2, yet Kubernetes still streams over it); the deflate itself is `flate2` (zlib-rs, which
//! supports preset dictionaries).
//!
//! Wire format (draft-mbelshe-httpbis-spdy-00, SPDY/3.1): every frame has an 8-byte header.
//! A control frame starts with bit 1, a 15-bit version (3) and a 16-bit type; a data frame
//! with bit 0 and a 31-bit stream id. Then 8 bits of flags and a 24-bit length. Header blocks
//! (SYN_STREAM, SYN_REPLY, HEADERS) are one zlib stream per direction per session, each block
//! ended by a sync flush.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The protocol version this codec speaks.
pub const VERSION: u16 = 3;
/// FLAG_FIN on data frames, SYN_STREAM, SYN_REPLY and HEADERS.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// The largest payload a frame can carry (24-bit length).
pub const MAX_LENGTH: usize = (1 << 24) - 1;
/// The largest decompressed header block accepted.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// SETTINGS id of the initial per-stream window.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Header names and values; a name may repeat (SPDY joins repeated values with NUL).
pub type Headers = Vec<(String, String)>;

/// The value of `name` in `headers` (names are compared lowercased, as SPDY sends them).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One SETTINGS entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    /// A control frame of a type this codec does not know: the spec says to ignore it.
    Unknown {
        kind: u16,
    },
}

impl Frame {
    /// The SYN_STREAM a client opens stream `stream_id` with (priority 0, no association).
    pub fn syn_stream(stream_id: u32, headers: &[(&str, &str)], flags: u8) -> Frame {
        Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            flags,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    /// A control frame of another SPDY version.
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    /// A frame's payload is shorter or longer than its type requires.
    #[error("malformed {kind} frame: {detail}")]
    Malformed { kind: &'static str, detail: String },
    /// A header block did not inflate with the SPDY dictionary.
    #[error("header block: {0}")]
    Compression(String),
    /// A header block inflated beyond the limit.
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    /// A frame's payload is larger than 24 bits allow.
    #[error("frame payload of {0} bytes is too large")]
    TooLarge(usize),
}

fn malformed(kind: &'static str, detail: impl Into<String>) -> SpdyError {
    SpdyError::Malformed {
        kind,
        detail: detail.into(),
    }
}

/// The fixed 8-byte header every frame starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    word: u32,
    pub flags: u8,
    pub length: usize,
}

impl FrameHeader {
    pub fn parse(bytes: [u8; 8]) -> Self {
        let word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        FrameHeader {
            word,
            flags: bytes[4],
            length: u32::from_be_bytes([0, bytes[5], bytes[6], bytes[7]]) as usize,
        }
    }
}

/// The SPDY/3 header compression dictionary: length-prefixed header words, then common
/// values, 1423 bytes in all (adler32 0xe3c6a7c2, the dictionary id in every compressed block).
pub fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
            "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
            "400 Bad Request401 Unauthorized403 Forbidden404 Not Found",
            "500 Internal Server Error501 Not Implemented503 Service Unavailable",
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
            "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,",
            "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
            "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
        );
        let mut dict = Vec::with_capacity(1423);
        for word in WORDS {
            dict.extend_from_slice(&(word.len() as u32).to_be_bytes());
            dict.extend_from_slice(word.as_bytes());
        }
        dict.extend_from_slice(TAIL.as_bytes());
        dict
    })
}

/// Encodes and decodes frames for one session; it holds the two zlib streams, so every
/// frame of a connection must pass through the same codec, in order.
pub struct Codec {
    deflate: Compress,
    inflate: Decompress,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(dictionary())
            .expect("a fresh deflate stream takes a dictionary");
        Codec {
            deflate,
            inflate: Decompress::new(true),
        }
    }

    /// The wire bytes of `frame`.
    pub fn encode(&mut self, frame: &Frame) -> Result<Vec<u8>, SpdyError> {
        let (kind, flags, payload) = match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_LENGTH {
                    return Err(SpdyError::TooLarge(data.len()));
                }
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                out.extend_from_slice(&length_word(*flags, data.len()));
                out.extend_from_slice(data);
                return Ok(out);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let mut p = Vec::new();
                p.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&(associated_to & 0x7fff_ffff).to_be_bytes());
                p.push((priority & 0x7) << 5);
                p.push(0); // slot
                p.extend(self.compress(headers)?);
                (SYN_STREAM, *flags, p)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let mut p = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
                p.extend(self.compress(headers)?);
                (SYN_REPLY, *flags, p)
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let mut p = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
                p.extend(self.compress(headers)?);
                (HEADERS, *flags, p)
            }
            Frame::RstStream { stream_id, status } => {
                (RST_STREAM, 0, words(&[stream_id & 0x7fff_ffff, *status]))
            }
            Frame::Settings { flags, entries } => {
                let mut p = (entries.len() as u32).to_be_bytes().to_vec();
                for e in entries {
                    p.extend_from_slice(
                        &(((e.flags as u32) << 24) | (e.id & 0xff_ffff)).to_be_bytes(),
                    );
                    p.extend_from_slice(&e.value.to_be_bytes());
                }
                (SETTINGS, *flags, p)
            }
            Frame::Ping { id } => (PING, 0, words(&[*id])),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => (
                GOAWAY,
                0,
                words(&[last_good_stream_id & 0x7fff_ffff, *status]),
            ),
            Frame::WindowUpdate { stream_id, delta } => (
                WINDOW_UPDATE,
                0,
                words(&[stream_id & 0x7fff_ffff, delta & 0x7fff_ffff]),
            ),
            Frame::Unknown { kind } => (*kind, 0, Vec::new()),
        };
        if payload.len() > MAX_LENGTH {
            return Err(SpdyError::TooLarge(payload.len()));
        }
        let mut out = Vec::with_capacity(8 + payload.len());
        out.extend_from_slice(
            &(0x8000_0000u32 | ((VERSION as u32) << 16) | kind as u32).to_be_bytes(),
        );
        out.extend_from_slice(&length_word(flags, payload.len()));
        out.extend(payload);
        Ok(out)
    }

    /// The frame whose header is `head` and whose payload (of `head.length` bytes) is `payload`.
    pub fn decode(&mut self, head: FrameHeader, payload: Vec<u8>) -> Result<Frame, SpdyError> {
        if head.word & 0x8000_0000 == 0 {
            return Ok(Frame::Data {
                stream_id: head.word & 0x7fff_ffff,
                flags: head.flags,
                data: payload,
            });
        }
        let version = ((head.word >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = (head.word & 0xffff) as u16;
        let flags = head.flags;
        let p = &payload[..];
        let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let need = |name: &'static str, n: usize, exact: bool| {
            let ok = if exact { p.len() == n } else { p.len() >= n };
            match ok {
                true => Ok(()),
                false => Err(malformed(name, format!("{} payload bytes", p.len()))),
            }
        };
        Ok(match kind {
            SYN_STREAM => {
                need("SYN_STREAM", 10, false)?;
                Frame::SynStream {
                    stream_id: word(0) & 0x7fff_ffff,
                    associated_to: word(4) & 0x7fff_ffff,
                    priority: p[8] >> 5,
                    flags,
                    headers: self.decompress(&p[10..])?,
                }
            }
            SYN_REPLY => {
                need("SYN_REPLY", 4, false)?;
                Frame::SynReply {
                    stream_id: word(0) & 0x7fff_ffff,
                    flags,
                    headers: self.decompress(&p[4..])?,
                }
            }
            HEADERS => {
                need("HEADERS", 4, false)?;
                Frame::Headers {
                    stream_id: word(0) & 0x7fff_ffff,
                    flags,
                    headers: self.decompress(&p[4..])?,
                }
            }
            RST_STREAM => {
                need("RST_STREAM", 8, true)?;
                Frame::RstStream {
                    stream_id: word(0) & 0x7fff_ffff,
                    status: word(4),
                }
            }
            SETTINGS => {
                need("SETTINGS", 4, false)?;
                let n = word(0) as usize;
                if p.len() != 4 + n.saturating_mul(8) {
                    return Err(malformed(
                        "SETTINGS",
                        format!("{n} entries in {} bytes", p.len()),
                    ));
                }
                let entries = (0..n)
                    .map(|i| {
                        let at = 4 + i * 8;
                        Setting {
                            flags: p[at],
                            id: word(at) & 0xff_ffff,
                            value: word(at + 4),
                        }
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            PING => {
                need("PING", 4, true)?;
                Frame::Ping { id: word(0) }
            }
            GOAWAY => {
                need("GOAWAY", 8, true)?;
                Frame::GoAway {
                    last_good_stream_id: word(0) & 0x7fff_ffff,
                    status: word(4),
                }
            }
            WINDOW_UPDATE => {
                need("WINDOW_UPDATE", 8, true)?;
                Frame::WindowUpdate {
                    stream_id: word(0) & 0x7fff_ffff,
                    delta: word(4) & 0x7fff_ffff,
                }
            }
            kind => Frame::Unknown { kind },
        })
    }

    fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        // Repeated names become one entry with NUL-separated values.
        let mut merged: Vec<(String, String)> = Vec::new();
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            match merged.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => {
                    v.push('\0');
                    v.push_str(value);
                }
                None => merged.push((name, value.clone())),
            }
        }
        let mut block = (merged.len() as u32).to_be_bytes().to_vec();
        for (name, value) in &merged {
            block.extend_from_slice(&(name.len() as u32).to_be_bytes());
            block.extend_from_slice(name.as_bytes());
            block.extend_from_slice(&(value.len() as u32).to_be_bytes());
            block.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut input = &block[..];
        loop {
            out.reserve(block.len() + 64);
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            input = &input[(self.deflate.total_in() - before) as usize..];
            // A sync flush is complete once the output buffer was not filled up.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    fn decompress(&mut self, mut input: &[u8]) -> Result<Headers, SpdyError> {
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        loop {
            if out.len() >= MAX_HEADER_BLOCK {
                return Err(SpdyError::HeaderBlockTooLarge);
            }
            out.reserve(4096);
            let before = self.inflate.total_in();
            let result = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            input = &input[(self.inflate.total_in() - before) as usize..];
            match result {
                Ok(Status::Ok | Status::BufError)
                    if input.is_empty() && out.len() < out.capacity() =>
                {
                    break
                }
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|e| SpdyError::Compression(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Compression(e.to_string())),
            }
        }
        parse_block(&out)
    }
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

fn length_word(flags: u8, length: usize) -> [u8; 4] {
    ((flags as u32) << 24 | (length as u32 & 0xff_ffff)).to_be_bytes()
}

/// The name/value pairs of an inflated header block; NUL-separated values become repeats.
fn parse_block(block: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |detail: &str| malformed("header block", detail);
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], SpdyError> {
        let end = at.checked_add(n).filter(|&e| e <= block.len());
        let end = end.ok_or_else(|| bad("truncated"))?;
        let s = &block[at..end];
        at = end;
        Ok(s)
    };
    let count = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let pairs = count(take(4)?);
    let mut headers = Vec::new();
    for _ in 0..pairs {
        let n = count(take(4)?);
        let name = String::from_utf8(take(n)?.to_vec()).map_err(|_| bad("name is not UTF-8"))?;
        if name.is_empty() {
            return Err(bad("empty header name"));
        }
        let n = count(take(4)?);
        let value = String::from_utf8(take(n)?.to_vec()).map_err(|_| bad("value is not UTF-8"))?;
        for v in value.split('\0') {
            headers.push((name.to_ascii_lowercase(), v.to_string()));
        }
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(codec: &mut Codec, bytes: &[u8]) -> Frame {
        let head = FrameHeader::parse(bytes[..8].try_into().unwrap());
        assert_eq!(head.length, bytes.len() - 8);
        codec.decode(head, bytes[8..].to_vec()).unwrap()
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        let dict = dictionary();
        assert_eq!(dict.len(), 1423);
        assert_eq!(&dict[..11], b"\0\0\0\x07options");
        assert!(dict.ends_with(b",*,enq=0."));
        // The dictionary id every SPDY/3 compressed header block names in its zlib header.
        let mut adler = (1u32, 0u32);
        for &b in dict {
            adler.0 = (adler.0 + b as u32) % 65521;
            adler.1 = (adler.1 + adler.0) % 65521;
        }
        assert_eq!(adler.1 << 16 | adler.0, 0xe3c6_a7c2);
    }

    /// Two header blocks as a reference encoder (zlib 1.2.13 with the SPDY/3 dictionary, sync
    /// flush after each block, as golang.org/x/net/spdy's framer writes them) made them:
    /// `streamtype: error`, then `streamtype: stdout` on the same zlib stream. The first
    /// starts 0x78 0xbb (FDICT set) and names the dictionary id e3c6a7c2.
    #[test]
    fn reference_header_blocks_inflate_in_sequence() {
        let first =
            hex::decode("78bbe3c6a7c202a62346703a2b294a4dcc851625aca9a08006000000ffff").unwrap();
        let second = hex::decode("c22a054ccc29f9a52500000000ffff").unwrap();
        let mut codec = Codec::new();
        let syn = |id: u32, block: &[u8]| {
            let mut p = words(&[id, 0]);
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(block);
            let mut f = vec![0x80, 0x03, 0x00, 0x01];
            f.extend_from_slice(&length_word(0, p.len()));
            f.extend(p);
            f
        };
        let frame = roundtrip(&mut codec, &syn(1, &first));
        assert_eq!(
            frame,
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "error".into())],
            }
        );
        let Frame::SynStream {
            stream_id, headers, ..
        } = roundtrip(&mut codec, &syn(3, &second))
        else {
            panic!("a SYN_STREAM");
        };
        assert_eq!(
            (stream_id, headers),
            (3, vec![("streamtype".into(), "stdout".into())])
        );
    }

    #[test]
    fn header_blocks_survive_a_session_of_frames() {
        let (mut server, mut client) = (Codec::new(), Codec::new());
        for i in 0..5u32 {
            let frame = Frame::SynReply {
                stream_id: 2 * i + 1,
                flags: FLAG_FIN,
                headers: vec![
                    ("streamtype".into(), "stdout".into()),
                    ("port".into(), format!("{}", 8000 + i)),
                    ("x-multi".into(), "a".into()),
                    ("X-Multi".into(), "b".into()),
                ],
            };
            let bytes = server.encode(&frame).unwrap();
            assert_eq!(&bytes[..4], &[0x80, 0x03, 0x00, 0x02]);
            assert_eq!(bytes[4], FLAG_FIN);
            let Frame::SynReply { headers, .. } = roundtrip(&mut client, &bytes) else {
                panic!("a SYN_REPLY");
            };
            assert_eq!(
                header(&headers, "port"),
                Some(format!("{}", 8000 + i).as_str())
            );
            let multi: Vec<_> = headers.iter().filter(|(n, _)| n == "x-multi").collect();
            assert_eq!(
                multi.len(),
                2,
                "repeated values travel NUL-joined: {headers:?}"
            );
        }
    }

    #[test]
    fn fixed_frames_have_the_specs_bytes() {
        let mut codec = Codec::new();
        let cases: Vec<(Frame, &str)> = vec![
            (Frame::Ping { id: 2 }, "80030006000000040000000 2"),
            (
                Frame::RstStream {
                    stream_id: 5,
                    status: rst::CANCEL,
                },
                "8003000300000008 00000005 00000005",
            ),
            (
                Frame::GoAway {
                    last_good_stream_id: 7,
                    status: goaway::OK,
                },
                "8003000700000008 00000007 00000000",
            ),
            (
                Frame::WindowUpdate {
                    stream_id: 0,
                    delta: 65536,
                },
                "8003000900000008 00000000 00010000",
            ),
            (
                Frame::Settings {
                    flags: 0,
                    entries: vec![Setting {
                        flags: 0,
                        id: SETTINGS_INITIAL_WINDOW_SIZE,
                        value: 1 << 20,
                    }],
                },
                "800300040000000c 00000001 00000007 00100000",
            ),
            (
                Frame::Data {
                    stream_id: 3,
                    flags: FLAG_FIN,
                    data: b"hi".to_vec(),
                },
                "00000003 01000002 6869",
            ),
        ];
        for (frame, hexed) in cases {
            let expected = hex::decode(hexed.replace(' ', "")).unwrap();
            let bytes = codec.encode(&frame).unwrap();
            assert_eq!(bytes, expected, "{frame:?}");
            assert_eq!(roundtrip(&mut codec, &bytes), frame);
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut codec = Codec::new();
        let head = |b: &str| FrameHeader::parse(hex::decode(b).unwrap().try_into().unwrap());
        // SPDY/2 control frame.
        assert_eq!(
            codec.decode(head("8002000600000004"), vec![0; 4]),
            Err(SpdyError::Version(2))
        );
        // A PING of 3 bytes, a SYN_STREAM of 2.
        assert!(codec.decode(head("8003000600000003"), vec![0; 3]).is_err());
        assert!(codec.decode(head("8003000100000002"), vec![0; 2]).is_err());
        // SETTINGS claiming more entries than it holds.
        assert!(codec
            .decode(head("8003000400000004"), vec![0xff; 4])
            .is_err());
        // A header block that is not zlib.
        let mut p = vec![0u8; 10];
        p.extend_from_slice(b"not zlib at all");
        assert!(codec.decode(head("8003000100000019"), p).is_err());
        // Unknown control types are skipped.
        assert_eq!(
            Codec::new().decode(head("8003000a00000000"), vec![]),
            Ok(Frame::Unknown { kind: 10 })
        );
    }

    #[test]
    fn truncated_header_blocks_are_refused() {
        assert!(parse_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(parse_block(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(parse_block(&[0, 0, 0, 0]).unwrap(), Vec::new());
    }
}
