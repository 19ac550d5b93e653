//! A SPDY/3.1 server session over one upgraded connection: the client (the API server's
//! spdystream) opens streams, the session replies to each and hands it to the caller as a
//! `Stream` (its headers, a reader and a writer). One task reads frames, one writes them; the
//! caller's tasks only exchange bytes with them through channels.
//!
//! - Half-close: a FIN from the client ends that stream's reader; `StreamWriter::close` sends
//!   ours. A stream closed both ways is forgotten.
//! - RST_STREAM from the client ends both halves of that stream; `StreamWriter::reset` sends one.
//! - PING from the client is echoed; GOAWAY from the client stops new streams;
//!   `Session::close` sends our GOAWAY after everything queued and shuts the connection down.
//! - Flow control (3.1: per stream and for the session, 64 KiB initial windows): what the
//!   caller consumed is returned to the client with WINDOW_UPDATE. Our sends honour the
//!   client's windows once the client takes part in flow control (a WINDOW_UPDATE or an
//!   INITIAL_WINDOW_SIZE setting): spdystream, the only client Kubernetes uses, never sends
//!   WINDOW_UPDATE nor limits its own sends, so with it sending is paced by TCP alone and
//!   receiving by the bounded per-stream queues below.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::spdy::{
    goaway, rst, Codec, Frame, FrameHeader, Headers, FLAG_FIN, FLAG_UNIDIRECTIONAL, MAX_LENGTH,
    SETTINGS_INITIAL_WINDOW_SIZE,
};

/// The initial flow-control window of a stream and of the session.
pub const INITIAL_WINDOW: i64 = 64 * 1024;
/// The largest DATA frame this side sends.
const MAX_DATA_FRAME: usize = 32 * 1024;
/// Received DATA frames queued per stream before reading more frames waits for the caller.
const STREAM_QUEUE: usize = 16;
/// How long the connection is kept for the client to close it after our GOAWAY.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// One stream the client opened.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    pub reader: StreamReader,
    pub writer: StreamWriter,
}

/// What the writer task sends.
enum Outgoing {
    Frame(Frame),
    /// Flush and shut the connection's write side down.
    Close,
}

struct StreamState {
    /// Where the client's DATA goes; None once the client half-closed.
    data: Option<mpsc::Sender<Vec<u8>>>,
    send_window: i64,
    local_closed: bool,
}

struct State {
    streams: HashMap<u32, StreamState>,
    session_window: i64,
    initial_window: i64,
    /// The client sent WINDOW_UPDATE or INITIAL_WINDOW_SIZE: honour its windows.
    peer_flow_control: bool,
    last_stream: u32,
    /// GOAWAY sent or received: no new streams.
    going_away: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Woken when a window grows or a stream or the session ends.
    changed: Notify,
    out: mpsc::Sender<Outgoing>,
    /// Cancelled when the client's side of the connection ended.
    gone: CancellationToken,
    /// Cancelled when the connection is to be dropped now.
    abort: CancellationToken,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn send(&self, frame: Frame) -> std::io::Result<()> {
        self.out
            .send(Outgoing::Frame(frame))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Forgets a stream closed both ways.
    fn reap(state: &mut State, id: u32) {
        if state
            .streams
            .get(&id)
            .is_some_and(|s| s.local_closed && s.data.is_none())
        {
            state.streams.remove(&id);
        }
    }
}

/// The session: closing it, and learning when the client went away.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Starts serving `io`; streams the client opens arrive on the receiver.
    pub fn serve<IO>(io: IO) -> (Session, mpsc::Receiver<Stream>)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (streams_tx, streams_rx) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                streams: HashMap::new(),
                session_window: INITIAL_WINDOW,
                initial_window: INITIAL_WINDOW,
                peer_flow_control: false,
                last_stream: 0,
                going_away: false,
            }),
            changed: Notify::new(),
            out: out_tx,
            gone: CancellationToken::new(),
            abort: CancellationToken::new(),
        });
        // Each direction has a zlib stream of its own: the writer deflates, the reader inflates.
        tokio::spawn(write_loop(write, out_rx, shared.clone()));
        tokio::spawn(read_loop(read, shared.clone(), streams_tx));
        (Session { shared }, streams_rx)
    }

    /// Completes when the client's side of the connection ended (closed, reset or broken).
    pub async fn gone(&self) {
        self.shared.gone.cancelled().await
    }

    /// Drops the connection now (the idle timeout): the session ends as if the client went.
    pub fn abort(&self) {
        self.shared.abort.cancel();
        self.shared.changed.notify_waiters();
    }

    /// Sends GOAWAY after everything queued, then shuts the connection down; the client gets
    /// a short grace to close its side.
    pub async fn close(&self) {
        let last = {
            let mut state = self.shared.state();
            state.going_away = true;
            state.last_stream
        };
        let _ = self
            .shared
            .send(Frame::GoAway {
                last_good_stream_id: last,
                status: goaway::OK,
            })
            .await;
        let _ = self.shared.out.send(Outgoing::Close).await;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shared.gone.cancelled() => {}
                _ = tokio::time::sleep(CLOSE_GRACE) => {}
            }
            shared.abort.cancel();
        });
    }
}

async fn write_loop<W: AsyncWrite>(
    write: W,
    mut out: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) {
    tokio::pin!(write);
    let mut codec = Codec::new();
    loop {
        let next = tokio::select! {
            next = out.recv() => next,
            _ = shared.abort.cancelled() => None,
        };
        let Some(next) = next else { break };
        let frame = match next {
            Outgoing::Frame(frame) => frame,
            Outgoing::Close => {
                let _ = write.flush().await;
                let _ = write.shutdown().await;
                // The reader goes on until the client closes (or the grace ends), so that
                // nothing it still sends turns our close into a reset that loses its data.
                shared.changed.notify_waiters();
                return;
            }
        };
        let bytes = codec.encode(&frame);
        let written = match bytes {
            Ok(bytes) => write.write_all(&bytes).await,
            Err(e) => {
                debug!(error = %e, "unencodable SPDY frame");
                continue;
            }
        };
        let flushed = match (written, out.is_empty()) {
            (Ok(()), true) => write.flush().await,
            (r, _) => r,
        };
        if let Err(e) = flushed {
            debug!(error = %e, "writing to the SPDY connection");
            break;
        }
    }
    // Nothing more can be sent: wake writers so they fail.
    shared.abort.cancel();
    shared.changed.notify_waiters();
}

async fn read_loop<R: AsyncRead>(read: R, shared: Arc<Shared>, streams: mpsc::Sender<Stream>) {
    tokio::pin!(read);
    let mut codec = Codec::new();
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut read, &mut codec) => frame,
            _ = shared.abort.cancelled() => break,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                debug!(error = %e, "reading the SPDY connection");
                let last = shared.state().last_stream;
                let _ = shared
                    .send(Frame::GoAway {
                        last_good_stream_id: last,
                        status: goaway::PROTOCOL_ERROR,
                    })
                    .await;
                let _ = shared.out.send(Outgoing::Close).await;
                break;
            }
        };
        if handle(frame, &shared, &streams).await.is_err() {
            break;
        }
    }
    {
        let mut state = shared.state();
        state.going_away = true;
        for s in state.streams.values_mut() {
            s.data = None;
        }
    }
    shared.gone.cancel();
    shared.changed.notify_waiters();
}

/// The next frame on `read`, decoded with `codec` (the reading side's), None at a clean end
/// of the connection.
pub async fn read_frame<R: AsyncRead + Unpin>(
    read: &mut R,
    codec: &mut Codec,
) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 8];
    match read.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let head = FrameHeader::parse(head);
    let mut payload = vec![0u8; head.length.min(MAX_LENGTH)];
    read.read_exact(&mut payload).await?;
    let frame = codec.decode(head, payload);
    frame.map(Some).map_err(std::io::Error::other)
}

/// Acts on one frame from the client; Err when the connection can no longer be written.
async fn handle(
    frame: Frame,
    shared: &Arc<Shared>,
    streams: &mpsc::Sender<Stream>,
) -> std::io::Result<()> {
    match frame {
        Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } => {
            let refusal = {
                let mut state = shared.state();
                if stream_id % 2 == 0 || stream_id <= state.last_stream {
                    Some(rst::PROTOCOL_ERROR)
                } else if state.going_away {
                    Some(rst::REFUSED_STREAM)
                } else {
                    state.last_stream = stream_id;
                    None
                }
            };
            if let Some(status) = refusal {
                return shared.send(Frame::RstStream { stream_id, status }).await;
            }
            let (tx, rx) = mpsc::channel(STREAM_QUEUE);
            {
                let mut state = shared.state();
                let window = state.initial_window;
                state.streams.insert(
                    stream_id,
                    StreamState {
                        data: (flags & FLAG_FIN == 0).then_some(tx),
                        send_window: window,
                        local_closed: flags & FLAG_UNIDIRECTIONAL != 0,
                    },
                );
            }
            shared
                .send(Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Vec::new(),
                })
                .await?;
            let stream = Stream {
                id: stream_id,
                headers,
                reader: StreamReader {
                    id: stream_id,
                    rx,
                    shared: shared.clone(),
                },
                writer: StreamWriter {
                    id: stream_id,
                    shared: shared.clone(),
                },
            };
            if streams.send(stream).await.is_err() {
                shared.state().streams.remove(&stream_id);
                shared
                    .send(Frame::RstStream {
                        stream_id,
                        status: rst::REFUSED_STREAM,
                    })
                    .await?;
            }
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            let tx = {
                let state = shared.state();
                state.streams.get(&stream_id).and_then(|s| s.data.clone())
            };
            if let (Some(tx), false) = (tx, data.is_empty()) {
                // A reader that stopped reading just loses the data.
                let _ = tx.send(data).await;
            }
            if flags & FLAG_FIN != 0 {
                let mut state = shared.state();
                if let Some(s) = state.streams.get_mut(&stream_id) {
                    s.data = None;
                }
                Shared::reap(&mut state, stream_id);
            }
        }
        Frame::Headers {
            stream_id, flags, ..
        } if flags & FLAG_FIN != 0 => {
            let mut state = shared.state();
            if let Some(s) = state.streams.get_mut(&stream_id) {
                s.data = None;
            }
            Shared::reap(&mut state, stream_id);
        }
        Frame::RstStream { stream_id, .. } => {
            shared.state().streams.remove(&stream_id);
            shared.changed.notify_waiters();
        }
        Frame::WindowUpdate { stream_id, delta } => {
            {
                let mut state = shared.state();
                state.peer_flow_control = true;
                let delta = delta as i64;
                match stream_id {
                    0 => state.session_window += delta,
                    id => {
                        if let Some(s) = state.streams.get_mut(&id) {
                            s.send_window += delta;
                        }
                    }
                }
            }
            shared.changed.notify_waiters();
        }
        Frame::Settings { entries, .. } => {
            {
                let mut state = shared.state();
                for e in entries
                    .iter()
                    .filter(|e| e.id == SETTINGS_INITIAL_WINDOW_SIZE)
                {
                    let new = e.value as i64;
                    let grow = new - state.initial_window;
                    state.initial_window = new;
                    state.peer_flow_control = true;
                    for s in state.streams.values_mut() {
                        s.send_window += grow;
                    }
                }
            }
            shared.changed.notify_waiters();
        }
        // Client pings are odd; we never ping.
        Frame::Ping { id } if id % 2 == 1 => shared.send(Frame::Ping { id }).await?,
        Frame::GoAway { .. } => shared.state().going_away = true,
        _ => {}
    }
    Ok(())
}

/// The client's data on one stream.
pub struct StreamReader {
    id: u32,
    rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
}

impl StreamReader {
    /// The next chunk; None once the client half-closed or reset the stream, or went away.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let data = self.rx.recv().await?;
        // The bytes are ours now: give the client its window back.
        let delta = data.len() as u32;
        let _ = self
            .shared
            .out
            .try_send(Outgoing::Frame(Frame::WindowUpdate {
                stream_id: self.id,
                delta,
            }));
        let _ = self
            .shared
            .out
            .try_send(Outgoing::Frame(Frame::WindowUpdate {
                stream_id: 0,
                delta,
            }));
        Some(data)
    }
}

/// Our side of one stream. Clones write to the same stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    shared: Arc<Shared>,
}

fn broken() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::BrokenPipe)
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data`, waiting for window when the client limits it.
    pub async fn write(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = self.reserve(data.len().min(MAX_DATA_FRAME)).await?;
            self.shared
                .send(Frame::Data {
                    stream_id: self.id,
                    flags: 0,
                    data: data[..n].to_vec(),
                })
                .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Up to `want` bytes of window, taken from the stream's and the session's.
    async fn reserve(&self, want: usize) -> std::io::Result<usize> {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut guard = self.shared.state();
                let state = &mut *guard;
                if self.shared.abort.is_cancelled() {
                    return Err(broken());
                }
                let stream = state.streams.get_mut(&self.id).ok_or_else(broken)?;
                if stream.local_closed {
                    return Err(broken());
                }
                if !state.peer_flow_control {
                    return Ok(want);
                }
                let window = stream.send_window.min(state.session_window);
                if window > 0 {
                    let n = want.min(window as usize);
                    stream.send_window -= n as i64;
                    state.session_window -= n as i64;
                    return Ok(n);
                }
            }
            notified.await;
        }
    }

    /// Half-closes our side (DATA with FIN). Closing twice is harmless.
    pub async fn close(&self) {
        let send = {
            let mut state = self.shared.state();
            let open = match state.streams.get_mut(&self.id) {
                Some(s) if !s.local_closed => {
                    s.local_closed = true;
                    true
                }
                _ => false,
            };
            Shared::reap(&mut state, self.id);
            open
        };
        if send {
            let _ = self
                .shared
                .send(Frame::Data {
                    stream_id: self.id,
                    flags: FLAG_FIN,
                    data: Vec::new(),
                })
                .await;
        }
    }

    /// Ends the stream both ways with RST_STREAM `status`.
    pub async fn reset(&self, status: u32) {
        self.shared.state().streams.remove(&self.id);
        self.shared.changed.notify_waiters();
        let _ = self
            .shared
            .send(Frame::RstStream {
                stream_id: self.id,
                status,
            })
            .await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::server::stream::spdy::header;

    /// A test client on the other end of an in-memory pipe.
    pub(crate) struct Client {
        codec: Codec,
        io: tokio::io::DuplexStream,
    }

    impl Client {
        pub(crate) fn new(io: tokio::io::DuplexStream) -> Self {
            Client {
                codec: Codec::new(),
                io,
            }
        }

        pub(crate) async fn send(&mut self, frame: Frame) {
            let bytes = self.codec.encode(&frame).unwrap();
            self.io.write_all(&bytes).await.unwrap();
        }

        pub(crate) async fn recv(&mut self) -> Option<Frame> {
            read_frame(&mut self.io, &mut self.codec).await.unwrap()
        }

        /// The next frame that is not a WINDOW_UPDATE.
        pub(crate) async fn recv_skipping_windows(&mut self) -> Option<Frame> {
            loop {
                match self.recv().await? {
                    Frame::WindowUpdate { .. } => continue,
                    f => return Some(f),
                }
            }
        }

        pub(crate) async fn open(&mut self, id: u32, headers: &[(&str, &str)], flags: u8) {
            self.send(Frame::syn_stream(id, headers, flags)).await;
        }
    }

    fn pair() -> (Client, Session, mpsc::Receiver<Stream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (session, streams) = Session::serve(b);
        (Client::new(a), session, streams)
    }

    #[tokio::test]
    async fn streams_are_replied_and_carry_data_both_ways_with_half_close() {
        let (mut client, session, mut streams) = pair();
        client.open(1, &[("streamType", "stdin")], 0).await;
        assert!(matches!(
            client.recv().await,
            Some(Frame::SynReply { stream_id: 1, .. })
        ));
        let mut stream = streams.recv().await.unwrap();
        assert_eq!(header(&stream.headers, "streamtype"), Some("stdin"));

        client
            .send(Frame::Data {
                stream_id: 1,
                flags: 0,
                data: b"hello".to_vec(),
            })
            .await;
        client
            .send(Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: b" world".to_vec(),
            })
            .await;
        assert_eq!(stream.reader.recv().await.unwrap(), b"hello");
        assert_eq!(stream.reader.recv().await.unwrap(), b" world");
        assert_eq!(stream.reader.recv().await, None, "FIN ends the reader");
        // Consumed bytes come back as window, for the stream and the session.
        assert_eq!(
            client.recv().await,
            Some(Frame::WindowUpdate {
                stream_id: 1,
                delta: 5
            })
        );
        assert_eq!(
            client.recv().await,
            Some(Frame::WindowUpdate {
                stream_id: 0,
                delta: 5
            })
        );

        // Our half is still open after theirs closed.
        stream.writer.write(b"out").await.unwrap();
        stream.writer.close().await;
        assert!(
            stream.writer.write(b"late").await.is_err(),
            "closed is closed"
        );
        assert_eq!(
            client.recv_skipping_windows().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: 0,
                data: b"out".to_vec()
            })
        );
        assert_eq!(
            client.recv_skipping_windows().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: vec![]
            })
        );

        session.close().await;
        assert!(matches!(
            client.recv_skipping_windows().await,
            Some(Frame::GoAway {
                last_good_stream_id: 1,
                status: goaway::OK
            })
        ));
        assert_eq!(
            client.recv().await,
            None,
            "the connection is shut down after GOAWAY"
        );
    }

    #[tokio::test]
    async fn pings_are_echoed_and_bad_stream_ids_reset() {
        let (mut client, _session, mut streams) = pair();
        client.send(Frame::Ping { id: 1 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 1 }));
        client.open(3, &[], 0).await;
        assert!(matches!(
            client.recv().await,
            Some(Frame::SynReply { stream_id: 3, .. })
        ));
        let _kept = streams.recv().await.unwrap();
        for id in [2, 3, 1] {
            client.open(id, &[], 0).await;
            assert_eq!(
                client.recv().await,
                Some(Frame::RstStream {
                    stream_id: id,
                    status: rst::PROTOCOL_ERROR
                }),
                "stream {id}: even, reused or going backwards"
            );
        }
    }

    #[tokio::test]
    async fn a_reset_stream_refuses_writes_and_ends_its_reader() {
        let (mut client, _session, mut streams) = pair();
        client.open(1, &[], 0).await;
        let mut stream = streams.recv().await.unwrap();
        client
            .send(Frame::RstStream {
                stream_id: 1,
                status: rst::CANCEL,
            })
            .await;
        assert_eq!(stream.reader.recv().await, None);
        // The reset is seen once the frame was read: wait for the reader to be closed.
        assert!(stream.writer.write(b"x").await.is_err());
        stream.writer.reset(rst::CANCEL).await;
    }

    #[tokio::test]
    async fn sends_wait_for_window_once_the_client_does_flow_control() {
        let (mut client, _session, mut streams) = pair();
        client
            .send(Frame::Settings {
                flags: 0,
                entries: vec![super::super::spdy::Setting {
                    flags: 0,
                    id: SETTINGS_INITIAL_WINDOW_SIZE,
                    value: 4,
                }],
            })
            .await;
        client.open(1, &[], 0).await;
        let stream = streams.recv().await.unwrap();
        let writer = stream.writer.clone();
        let sent = tokio::spawn(async move { writer.write(b"0123456789").await });
        let mut got = Vec::new();
        let _reply = client.recv().await;
        for want in [&b"0123"[..], b"4567", b"89"] {
            let Some(Frame::Data { data, .. }) = client.recv().await else {
                panic!()
            };
            assert_eq!(data, want, "no more than the window at a time");
            got.extend(data);
            client
                .send(Frame::WindowUpdate {
                    stream_id: 1,
                    delta: 4,
                })
                .await;
        }
        sent.await.unwrap().unwrap();
        assert_eq!(got, b"0123456789");
    }

    #[tokio::test]
    async fn without_flow_control_from_the_client_sends_are_not_held_back() {
        let (mut client, _session, mut streams) = pair();
        client.open(1, &[], 0).await;
        let stream = streams.recv().await.unwrap();
        let big = vec![7u8; 3 * INITIAL_WINDOW as usize];
        stream.writer.write(&big).await.unwrap();
        stream.writer.close().await;
        let _reply = client.recv().await;
        let mut got = 0;
        loop {
            match client.recv().await.unwrap() {
                Frame::Data { flags, data, .. } => {
                    assert!(data.len() <= MAX_DATA_FRAME);
                    got += data.len();
                    if flags & FLAG_FIN != 0 {
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, big.len());
    }

    #[tokio::test]
    async fn the_session_notices_the_client_going_away() {
        let (client, session, mut streams) = pair();
        drop(client);
        session.gone().await;
        assert!(streams.recv().await.is_none());
    }
}
