//! RESP framing and classification.
//!
//! - [`request`]: client requests, with Redis' own grammar and errors.
//! - [`reply`]: where each reply from Redis ends, without decoding it.
//! - [`command`]: what the proxy needs to know about a request.
//! - [`encode`], [`value`]: replies and commands the proxy writes itself,
//!   and decoding of the replies it reads.

pub mod command;
pub mod encode;
pub mod reply;
pub mod request;
pub mod value;
