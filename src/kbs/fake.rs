//! Fakes for tests of the KBS client and of the stages that drive it: a scripted,
//! recording [`FakeTransport`] and a [`ManualClock`] whose `sleep` only advances it.
//!
//! The fake transport does no cryptography; a test's handler plays the broker (see
//! `kbs::tests` for one that checks the binding and encrypts real JWEs).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::transport::{Clock, HttpResponse, Transport, TransportError};

/// The HTTP method of a recorded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
}

/// One request as the fake transport saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRequest {
    /// The method.
    pub method: Method,
    /// The absolute path, e.g. `/kbs/v0/auth`.
    pub path: String,
    /// The body (empty for `GET`).
    pub body: Vec<u8>,
    /// The `kbs-session-id` cookie sent.
    pub cookie: Option<String>,
    /// The bearer token sent.
    pub bearer: Option<String>,
    /// The timeout the client allowed for this request.
    pub timeout: Duration,
}

impl FakeRequest {
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// What the fake's handler does with a request.
pub type Handler = Box<dyn FnMut(&FakeRequest) -> Result<HttpResponse, TransportError> + Send>;

/// A shared view of the requests a [`FakeTransport`] received.
#[derive(Debug, Clone, Default)]
pub struct FakeLog(Arc<Mutex<Vec<FakeRequest>>>);

impl FakeLog {
    /// A copy of every request so far, in order.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<FakeRequest>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A transport that records each request and answers with a handler.
pub struct FakeTransport {
    base: String,
    handler: Handler,
    log: FakeLog,
}

impl fmt::Debug for FakeTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTransport")
            .field("base", &self.base)
            .field("requests", &self.log.lock().len())
            .finish_non_exhaustive()
    }
}

impl FakeTransport {
    /// A fake for base URL `base`, answering with `handler`; the log shows what it got.
    pub fn new(
        base: impl Into<String>,
        handler: impl FnMut(&FakeRequest) -> Result<HttpResponse, TransportError> + Send + 'static,
    ) -> (Self, FakeLog) {
        let log = FakeLog::default();
        (
            Self {
                base: base.into(),
                handler: Box::new(handler),
                log: log.clone(),
            },
            log,
        )
    }

    fn handle(&mut self, request: FakeRequest) -> Result<HttpResponse, TransportError> {
        self.log.lock().push(request.clone());
        (self.handler)(&request)
    }
}

impl Transport for FakeTransport {
    fn base_url(&self) -> &str {
        &self.base
    }

    fn post_json(
        &mut self,
        path: &str,
        body: &[u8],
        cookie: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        self.handle(FakeRequest {
            method: Method::Post,
            path: path.to_string(),
            body: body.to_vec(),
            cookie: cookie.map(str::to_string),
            bearer: None,
            timeout,
        })
    }

    fn get(
        &mut self,
        path: &str,
        cookie: Option<&str>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        self.handle(FakeRequest {
            method: Method::Get,
            path: path.to_string(),
            body: Vec::new(),
            cookie: cookie.map(str::to_string),
            bearer: bearer.map(str::to_string),
            timeout,
        })
    }
}

/// A clock that only moves when told to (or when something sleeps on it). Clones share the
/// same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    offset: Arc<Mutex<Duration>>,
    slept: Arc<Mutex<Vec<Duration>>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock at an arbitrary start.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            offset: Arc::default(),
            slept: Arc::default(),
        }
    }

    /// Moves time forward (e.g. a fake request that "takes" some time).
    pub fn advance(&self, by: Duration) {
        let mut offset = self.offset.lock().unwrap_or_else(PoisonError::into_inner);
        *offset += by;
    }

    /// Time elapsed since the clock was made.
    pub fn elapsed(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every sleep so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.slept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn sleep(&self, duration: Duration) {
        self.slept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(duration);
        self.advance(duration);
    }
}
