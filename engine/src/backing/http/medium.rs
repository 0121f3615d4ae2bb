//! An [`HttpBacking`] as a remote backing [`Medium`]: the reactors hand it
//! ranged reads without waiting; a fixed set of fetch threads (one per
//! pooled connection, so every connection can have a request in flight)
//! performs them with the client's blocking `read_at` and answers each one.
//!
//! Every submitted read is answered exactly once: with its bytes, or with
//! the client's error for that read (a changed remote image fails every
//! read from then on, see [`HttpBacking::read_at`]). When the medium is
//! dropped, the threads finish the reads already queued, then exit.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::{HttpBacking, HttpOptions};
use crate::backing::remote::{Medium, RemoteRead, SharedSpares};
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::pin::Pin;

/// The largest read one request asks for: big enough that a sequential
/// fill is a few requests per MiB, small enough that a retry is cheap.
pub const HTTP_MAX_READ: usize = 4 << 20;

/// Whether a backing file name is an HTTP(S) URL.
pub fn is_http_name(name: &str) -> bool {
    let lower = name.get(..8).unwrap_or(name).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

pub struct HttpMedium {
    name: String,
    client: Arc<HttpBacking>,
    jobs: Option<Sender<RemoteRead>>,
    threads: Vec<JoinHandle<()>>,
    spares: Arc<SharedSpares>,
}

impl HttpMedium {
    /// Opens `url` (probing its size and pinning its validator) and starts
    /// the fetch threads.
    pub fn open(url: &str, opts: HttpOptions) -> Result<HttpMedium> {
        let threads = opts.max_connections.max(1);
        let client = Arc::new(HttpBacking::open(url, opts).map_err(Error::from)?);
        let (tx, rx) = crossbeam_channel::unbounded::<RemoteRead>();
        let spares = Arc::new(SharedSpares::default());
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx: Receiver<RemoteRead> = rx.clone();
            let client = client.clone();
            let spares = spares.clone();
            let h = std::thread::Builder::new()
                .name(format!("backfill-http-{i}"))
                .spawn(move || fetch_loop(&client, &rx, &spares))
                .map_err(|e| Error::io(e, "spawning an HTTP fetch thread"))?;
            handles.push(h);
        }
        Ok(HttpMedium {
            name: url.to_string(),
            client,
            jobs: Some(tx),
            threads: handles,
            spares,
        })
    }

    /// The client's counters (requests, bytes, retries, latency).
    pub fn client(&self) -> &HttpBacking {
        &self.client
    }
}

fn fetch_loop(client: &HttpBacking, jobs: &Receiver<RemoteRead>, spares: &SharedSpares) {
    // Ends when the medium is dropped and the queue is empty.
    while let Ok(read) = jobs.recv() {
        if !read.dest.is_empty() {
            // SAFETY: this thread answers `read` (taken off the queue, so
            // no other thread has it) and completes it only below.
            let result = unsafe { client.read_placed(read.offset, read.len, &read.dest) };
            read.complete(result.map(|()| Vec::new()).map_err(Error::from));
            continue;
        }
        let mut buf = spares.take(read.len);
        let result = client
            .read_at(&mut buf, read.offset)
            .map(|()| buf)
            .map_err(Error::from);
        read.complete(result);
    }
}

impl Medium for HttpMedium {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.client.size()
    }

    fn max_read(&self) -> usize {
        HTTP_MAX_READ
    }

    fn pin(&self) -> Option<Pin> {
        self.client.validator().map(|v| Pin {
            name: self.name.clone(),
            size: self.client.size(),
            validator: v.clone(),
        })
    }

    fn recycle(&self, buf: Vec<u8>) {
        self.spares.give(buf);
    }

    /// The fetch threads read response bodies straight into the fill
    /// buffers (see `HttpBacking::read_placed`).
    fn places(&self) -> bool {
        true
    }

    fn submit(&self, read: RemoteRead) {
        debug_assert!(read.len <= HTTP_MAX_READ && read.offset + read.len as u64 <= self.size());
        let Some(jobs) = &self.jobs else {
            read.complete(Err(Error::new(
                ErrorKind::BackingUnavailable,
                format!("{}: the HTTP backing is shut down", self.name),
            )));
            return;
        };
        // Unbounded: the submitters' own in-flight limits bound the queue.
        if let Err(e) = jobs.send(read) {
            let read = e.into_inner();
            read.complete(Err(Error::new(
                ErrorKind::BackingUnavailable,
                format!("{}: the HTTP fetch threads are gone", self.name),
            )));
        }
    }
}

impl Drop for HttpMedium {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
