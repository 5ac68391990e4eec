//! Reading and writing `/troop/infer/1` frames on a libp2p stream.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use troop_protocol::frames::{self, Frame, FrameError};

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    let bytes = frames::encode(frame)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames;
/// everything else that is not a whole, valid frame is an error (and is
/// counted), after which the caller resets the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(count(FrameError::Truncated));
        }
        got += n;
    }
    let len = frames::body_len(prefix).map_err(count)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            count(FrameError::Truncated)
        } else {
            FrameError::Io(e)
        }
    })?;
    frames::decode(&body).map(Some).map_err(count)
}

fn count(e: FrameError) -> FrameError {
    let reason = match &e {
        FrameError::TooLarge(_) => "too_large",
        FrameError::Empty => "empty",
        FrameError::Malformed(_) => "malformed",
        FrameError::Version(_) => "version",
        FrameError::Truncated => "truncated",
        FrameError::Io(_) => "io",
    };
    metrics::counter!("troop_bad_frames_total", "reason" => reason).increment(1);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frames_round_trip_and_bad_input_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Frame::Chunk { text: "hi".into() })
            .await
            .expect("write");
        write_frame(
            &mut buf,
            &Frame::Chunk {
                text: "there".into(),
            },
        )
        .await
        .expect("write");
        let mut r = Cursor::new(buf.clone());
        assert_eq!(
            read_frame(&mut r).await.expect("read"),
            Some(Frame::Chunk { text: "hi".into() })
        );
        assert_eq!(
            read_frame(&mut r).await.expect("read"),
            Some(Frame::Chunk {
                text: "there".into()
            })
        );
        assert_eq!(read_frame(&mut r).await.expect("eof"), None);

        let mut truncated = Cursor::new(buf[..buf.len() - 2].to_vec());
        let _ = read_frame(&mut truncated).await.expect("first");
        assert!(matches!(
            read_frame(&mut truncated).await,
            Err(FrameError::Truncated)
        ));

        // A length over the cap is refused before any body is read.
        let mut huge = Cursor::new(vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert!(matches!(
            read_frame(&mut huge).await,
            Err(FrameError::TooLarge(_))
        ));

        let mut garbage = Cursor::new(vec![0, 0, 0, 3, 0xff, 0xfe, 0xfd]);
        assert!(matches!(
            read_frame(&mut garbage).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
