use std::future::poll_fn;

use super::*;

/// A socket that records each write it is given, accepting at most `limit` bytes per write
/// and refusing every other call when `stall` is set, as a full socket buffer does.
#[derive(Default)]
struct Socket {
    writes: Vec<Vec<u8>>,
    flushes: usize,
    limit: usize,
    stall: bool,
    stalled_last: bool,
}

impl Socket {
    fn sent(&self) -> Vec<u8> {
        self.writes.concat()
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stall && !self.stalled_last {
            self.stalled_last = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.stalled_last = false;
        let take = if self.limit == 0 {
            buf.len()
        } else {
            buf.len().min(self.limit)
        };
        self.writes.push(buf[..take].to_vec());
        Poll::Ready(Ok(take))
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flushes += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn write(buffer: &mut WriteBuffer, socket: &mut Socket, data: &[u8]) -> usize {
    poll_fn(|cx| buffer.poll_write(Pin::new(&mut *socket), cx, data))
        .await
        .expect("write")
}

async fn flush(buffer: &mut WriteBuffer, socket: &mut Socket) {
    poll_fn(|cx| buffer.poll_flush(Pin::new(&mut *socket), cx))
        .await
        .expect("flush");
}

#[tokio::test]
async fn a_response_head_and_body_leave_in_one_write_at_the_flush() {
    let mut socket = Socket::default();
    let mut buffer = WriteBuffer::new(64);
    assert_eq!(
        write(&mut buffer, &mut socket, b"HTTP/1.1 200 OK\r\n\r\n").await,
        19
    );
    assert_eq!(write(&mut buffer, &mut socket, b"{\"ok\":true}").await, 11);
    assert!(socket.writes.is_empty(), "nothing is sent before the flush");
    flush(&mut buffer, &mut socket).await;
    assert_eq!(socket.writes.len(), 1);
    assert_eq!(socket.sent(), b"HTTP/1.1 200 OK\r\n\r\n{\"ok\":true}");
    assert_eq!(socket.flushes, 1);
    assert!(buffer.is_empty());
}

#[tokio::test]
async fn a_write_that_does_not_fit_sends_what_is_gathered_first_then_itself() {
    let mut socket = Socket::default();
    let mut buffer = WriteBuffer::new(16);
    write(&mut buffer, &mut socket, b"head:").await;
    let large = vec![b'x'; 40];
    assert_eq!(write(&mut buffer, &mut socket, &large).await, 40);
    // The gathered head first, then the large write as it came: order kept, nothing copied.
    assert_eq!(socket.writes, vec![b"head:".to_vec(), large.clone()]);
    write(&mut buffer, &mut socket, b"tail").await;
    flush(&mut buffer, &mut socket).await;
    assert_eq!(
        socket.sent(),
        [b"head:".as_slice(), &large, b"tail"].concat()
    );
}

#[tokio::test]
async fn partial_and_refused_sends_keep_every_byte_in_order() {
    let mut socket = Socket {
        limit: 3,
        stall: true,
        ..Socket::default()
    };
    let mut buffer = WriteBuffer::new(8);
    let mut expected = Vec::new();
    for piece in [
        b"abcde".as_slice(),
        b"fghij",
        b"k",
        b"lmnopqrstuvwxyz",
        b"01",
    ] {
        let mut offset = 0;
        while offset < piece.len() {
            offset += write(&mut buffer, &mut socket, &piece[offset..]).await;
        }
        expected.extend_from_slice(piece);
    }
    flush(&mut buffer, &mut socket).await;
    assert_eq!(socket.sent(), expected);
    assert!(socket.writes.iter().all(|write| write.len() <= 3));
}

#[tokio::test]
async fn vectored_writes_are_gathered_whole() {
    let mut socket = Socket::default();
    let mut buffer = WriteBuffer::new(64);
    let slices = [
        io::IoSlice::new(b"5\r\n"),
        io::IoSlice::new(b"hello"),
        io::IoSlice::new(b"\r\n"),
    ];
    let written = poll_fn(|cx| buffer.poll_write_vectored(Pin::new(&mut socket), cx, &slices))
        .await
        .expect("write");
    assert_eq!(written, 10);
    flush(&mut buffer, &mut socket).await;
    assert_eq!(socket.writes, vec![b"5\r\nhello\r\n".to_vec()]);
}

#[tokio::test]
async fn with_no_capacity_every_write_passes_straight_through() {
    let mut socket = Socket::default();
    let mut buffer = WriteBuffer::new(0);
    write(&mut buffer, &mut socket, b"frame one").await;
    write(&mut buffer, &mut socket, b"frame two").await;
    assert_eq!(socket.writes.len(), 2);
    assert!(buffer.is_empty());
}
