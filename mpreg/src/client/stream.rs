//! [`ResultStream`]: the results of a streaming request, command by command
//! as they complete, then the final reply.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Sleep;

use super::conn::{Conn, StreamItem};
use super::{Inner, Results, results_of};
use crate::error::Error;

/// One command's result, received while its request was still running.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    name: String,
    value: Value,
}

impl Progress {
    /// The command's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its result, as JSON.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Decodes its result.
    pub fn get<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(T::deserialize(&self.value)?)
    }

    /// The name and the result.
    pub fn into_parts(self) -> (String, Value) {
        (self.name, self.value)
    }
}

/// What a [`ResultStream`] yields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A command finished: its result. Every command of the request gets one
    /// (not only the sinks), in the order they finished.
    Progress(Progress),
    /// The request finished: the results the reply carries (the sinks', or
    /// every command's with
    /// [`return_intermediate_results`](crate::Request::return_intermediate_results)).
    /// Nothing follows it.
    Done(Results),
}

/// The results of a request sent with [`Client::stream`](super::Client::stream):
/// an [`Event::Progress`] for each command as soon as it finishes, then
/// [`Event::Done`] with the final results; or an error (the request failed,
/// the connection was lost, or no reply came in time), after which the
/// stream ends.
///
/// It implements [`futures_util::Stream`]; [`next`](Self::next) does the same
/// without importing a trait. Dropping it stops waiting (the request still
/// runs to its end on the node; what it sends is discarded).
///
/// Progress is buffered in the client up to the request's number of
/// commands, so a stream read slowly holds back neither the connection nor
/// other calls on it.
#[derive(Debug)]
pub struct ResultStream {
    /// The client: the request may be sent again on another connection.
    inner: Arc<Inner>,
    /// Kept so that the connection stays open while the stream is read.
    conn: Arc<Conn>,
    id: String,
    items: mpsc::Receiver<StreamItem>,
    /// When the client stops waiting (the request's deadline plus slack).
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
    /// Whether the last item (the result or an error) was yielded.
    ended: bool,
}

impl ResultStream {
    pub(super) fn new(
        inner: Arc<Inner>,
        conn: Arc<Conn>,
        id: String,
        items: mpsc::Receiver<StreamItem>,
        wait: Option<Duration>,
    ) -> Self {
        Self {
            inner,
            conn,
            id,
            items,
            deadline: wait.map(|w| (Box::pin(tokio::time::sleep(w)), w)),
            ended: false,
        }
    }

    /// The next event; `None` after the final result or an error.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        std::future::poll_fn(|cx| self.poll_next_event(cx)).await
    }

    /// Skips any progress still to come and returns the final results.
    pub async fn finish(mut self) -> Result<Results, Error> {
        // Bounded: the buffer holds at most one event per command, and the
        // stream ends at the final reply, an error or the deadline.
        loop {
            match self.next().await {
                Some(Ok(Event::Done(results))) => return Ok(results),
                Some(Ok(Event::Progress(_))) => continue,
                Some(Err(e)) => return Err(e),
                // Only after the end was already yielded.
                None => return Err(Error::Closed),
            }
        }
    }

    fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = match self.items.poll_recv(cx) {
            Poll::Ready(Some(StreamItem::Progress(name, value))) => {
                return Poll::Ready(Some(Ok(Event::Progress(Progress { name, value }))));
            }
            Poll::Ready(Some(StreamItem::Done(reply))) => results_of(reply).map(Event::Done),
            // The connection is gone: the reply cannot come.
            Poll::Ready(None) => Err(Error::Closed),
            Poll::Pending => {
                let Some((sleep, wait)) = &mut self.deadline else {
                    return Poll::Pending;
                };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Err(Error::Timeout(*wait))
            }
        };
        self.ended = true;
        Poll::Ready(Some(item))
    }
}

impl futures_util::Stream for ResultStream {
    type Item = Result<Event, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_next_event(cx)
    }
}

impl Drop for ResultStream {
    fn drop(&mut self) {
        super::forget(&self.inner, &self.conn, &self.id);
    }
}
