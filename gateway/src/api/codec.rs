//! The protobuf codec of the generated services: prost's, except that a
//! request that does not decode (a string field holding invalid UTF-8, a
//! truncated message) is the client's fault and answers `INVALID_ARGUMENT`
//! naming the field, where prost's codec says `INTERNAL`; and that a response
//! is encoded into a buffer grown once to its length, where prost's encoder
//! grows tonic's 8 KiB buffer by doubling as it writes, copying what it has
//! written each time (an MGet of 100 values: two copies, 8 and 16 KiB).

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost's codec with client-fault decode errors.
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ResponseEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder(ProstCodec::<T, U>::default().encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// Encodes with prost into a buffer reserved to the message's length first.
#[derive(Debug)]
pub struct ResponseEncoder<T>(ProstEncoder<T>);

impl<T: Message> Encoder for ResponseEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // A no-op when it fits already (every small response). Then what
        // `Message::encode` does after its own `encoded_len` (the buffer is
        // a growable `BytesMut`, so its capacity check never fails): a second
        // length walk would cost an MGet of 100 values ~85 instructions per
        // value (docs/BENCHMARKS.md).
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Decodes with prost, reporting malformed messages as `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == Code::Internal {
                Status::invalid_argument(format!("malformed request: {}", status.message()))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
